//! HTTP through hyper's client: one connection per exchange (like a client
//! that sends `Connection: close`), so no pooled connection outlives a server
//! restart, and the path goes on the wire exactly as given (`a/../b` stays
//! `a/../b`: tests of path handling need that, and URL-normalising clients
//! would rewrite it).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// How long one exchange may take before it is an error.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an exchange produced no response.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("the request cannot be sent: {0}")]
    InvalidRequest(#[from] http::Error),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP exchange: {0}")]
    Http(#[from] hyper::Error),
    #[error("no response within {0:?}")]
    Timeout(Duration),
}

/// One HTTP response: status, headers (names lowercased; a repeated header
/// keeps its last value) and the body as text.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Response {
    /// The body as JSON (panics with the status and body when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): status {} body {:?}",
                self.status, self.body
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The target of the `Link: <...>; rel="next"` header (RFC 8288), if any.
    pub fn next_link(&self) -> Option<String> {
        self.header("link")?.split(',').find_map(|link| {
            let (target, params) = link.trim().strip_prefix('<')?.split_once('>')?;
            params
                .split(';')
                .any(|p| matches!(p.trim(), "rel=\"next\"" | "rel=next"))
                .then(|| target.to_string())
        })
    }
}

/// A request being built: method, path (with its query), headers, body.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            method: method.into(),
            path: path.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("Authorization", &format!("Bearer {token}"))
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn json(mut self, v: &Value) -> Self {
        self.body = Some(v.to_string().into_bytes());
        self.header("Content-Type", "application/json")
    }

    pub fn raw_body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = Some(b.into());
        self
    }

    fn build(&self, host: &str) -> Result<http::Request<Full<Bytes>>, http::Error> {
        let mut b = http::Request::builder()
            .method(self.method.as_str())
            .uri(self.path.as_str())
            .header(http::header::HOST, host);
        for (k, v) in &self.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        let body = self.body.clone().unwrap_or_default();
        // An explicit length, also 0 for a bodiless POST, as curl sends it.
        if self.body.is_some() || self.method != "GET" {
            b = b.header(http::header::CONTENT_LENGTH, body.len());
        }
        b.body(Full::new(Bytes::from(body)))
    }
}

/// The runtime every client's exchanges run on; callers stay synchronous.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("testkit-http")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("the test kit's HTTP runtime: {e}"))
    })
}

/// Talks to one server address, over plain HTTP or TLS. Cheap to clone and
/// usable from any thread.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    host: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("host", &self.host)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Client {
    /// Plain HTTP to `addr`.
    pub fn http(addr: SocketAddr) -> Self {
        Self {
            addr,
            host: "localhost".into(),
            tls: None,
        }
    }

    /// HTTPS to `addr`, verifying the certificate for `server_name` with
    /// `config` (its roots and protocol versions are the test's choice).
    pub fn https(addr: SocketAddr, server_name: &str, config: rustls::ClientConfig) -> Self {
        Self {
            addr,
            host: server_name.into(),
            tls: Some(Arc::new(config)),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `r` on a new connection and reads the whole response.
    pub fn try_send(&self, r: &Request) -> Result<Response, HttpError> {
        let req = r.build(&self.host)?;
        runtime().block_on(async {
            tokio::time::timeout(EXCHANGE_TIMEOUT, self.exchange(req))
                .await
                .map_err(|_| HttpError::Timeout(EXCHANGE_TIMEOUT))?
        })
    }

    /// Sends `r`; panics when no response comes back.
    pub fn send(&self, r: Request) -> Response {
        self.try_send(&r)
            .unwrap_or_else(|e| panic!("{} {} to {}: {e}", r.method, r.path, self.addr))
    }

    async fn exchange(&self, req: http::Request<Full<Bytes>>) -> Result<Response, HttpError> {
        let addr = self.addr;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| HttpError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => over(TokioIo::new(tcp), req).await,
            Some(config) => {
                let name =
                    rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|e| {
                        HttpError::Tls {
                            addr,
                            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
                        }
                    })?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|source| HttpError::Tls { addr, source })?;
                over(TokioIo::new(tls), req).await
            }
        }
    }
}

async fn over<T>(io: T, req: http::Request<Full<Bytes>>) -> Result<Response, HttpError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    // The connection is driven beside the exchange; it ends with it.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::{Client, Request};
    use std::io::{BufRead, BufReader, Write};

    /// A one-shot server that records the request head it got and answers
    /// with `reply`.
    fn one_shot(reply: &'static str) -> (std::net::SocketAddr, std::thread::JoinHandle<String>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let h = std::thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut head = String::new();
            loop {
                let mut line = String::new();
                r.read_line(&mut line).expect("read");
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                head.push_str(&line);
            }
            (&s).write_all(reply.as_bytes()).expect("reply");
            head
        });
        (addr, h)
    }

    #[test]
    fn the_path_goes_on_the_wire_as_given() {
        let (addr, h) =
            one_shot("HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\nx-a: 1\r\n\r\n{}");
        let r = Client::http(addr)
            .try_send(&Request::new("GET", "/api/secrets/a/../b%20c").bearer("t"))
            .expect("response");
        let head = h.join().expect("server");
        assert!(
            head.starts_with("GET /api/secrets/a/../b%20c HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: bearer t"),
            "{head}"
        );
        assert_eq!(
            (r.status, r.header("X-A"), r.json()),
            (400, Some("1"), serde_json::json!({}))
        );
    }
}

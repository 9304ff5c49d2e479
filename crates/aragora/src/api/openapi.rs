//! The OpenAPI 3.1 document, generated from the route table and the request
//! and response types each route declares (schemas by utoipa from the same
//! types the handlers serialize).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};
use utoipa::openapi::RefOr;
use utoipa::openapi::path::{Parameter, ParameterIn};
use utoipa::openapi::schema::Schema;
use utoipa::{IntoParams, PartialSchema, ToSchema};

use super::views::ErrorView;
use super::{ROUTES, route_docs};

/// Named schemas collected while documenting routes (`components.schemas`).
pub type Components = Vec<(String, RefOr<Schema>)>;

/// A documented body: its content type and schema (`None`: no body).
pub type BodyDoc = Option<(&'static str, Value)>;

/// How a type appears as a request or response body.
pub trait DocBody {
    fn doc(components: &mut Components) -> BodyDoc;
}

impl<T: ToSchema> DocBody for T {
    fn doc(components: &mut Components) -> BodyDoc {
        T::schemas(components);
        Some(("application/json", schema_json(T::schema())))
    }
}

/// No body (requests without one; 204 responses).
#[derive(Debug)]
pub struct NoBody;

impl DocBody for NoBody {
    fn doc(_: &mut Components) -> BodyDoc {
        None
    }
}

/// A plain-text body (the Prometheus exposition).
#[derive(Debug)]
pub struct Text;

impl DocBody for Text {
    fn doc(_: &mut Components) -> BodyDoc {
        Some(("text/plain", json!({"type": "string"})))
    }
}

/// A request body that may be left out.
#[derive(Debug)]
pub struct Optional<T>(std::marker::PhantomData<T>);

impl<T: ToSchema> DocBody for Optional<T> {
    fn doc(components: &mut Components) -> BodyDoc {
        T::doc(components)
    }
}

/// Documents one body, collecting the schemas it names.
pub type DocFn = fn(&mut Components) -> BodyDoc;

/// Documents a route's query parameters.
pub type ParamsFn = fn() -> Vec<Parameter>;

/// A route without query parameters.
pub fn no_query() -> Vec<Parameter> {
    Vec::new()
}

/// The query parameters of a handler's `QueryParams<T>`, from the same struct
/// it deserializes (fields, their types and doc comments).
pub fn query_params<T: IntoParams>() -> Vec<Parameter> {
    T::into_params(|| Some(ParameterIn::Query))
}

/// One route's query parameters, request body and success responses
/// (status, body).
#[derive(Debug)]
pub struct RouteDoc {
    pub query: ParamsFn,
    pub request: DocFn,
    pub responses: Vec<(u16, DocFn)>,
}

fn schema_json(s: RefOr<Schema>) -> Value {
    serde_json::to_value(s).unwrap_or_else(|e| json!({"description": format!("schema error: {e}")}))
}

fn content(body: BodyDoc) -> Option<Value> {
    body.map(|(ty, schema)| json!({ ty: {"schema": schema} }))
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorView"}}},
    })
}

fn status_text(status: u16) -> &'static str {
    match status {
        201 => "created",
        202 => "accepted: running in the background",
        204 => "done; no body",
        _ => "success",
    }
}

/// The whole document: every route's path, method, summary, permission
/// (`x-permission`), path and query parameters, request body and responses, and the
/// schema of every type they name.
pub fn document() -> Value {
    let mut components: Components = Vec::new();
    components.push((ErrorView::name().into_owned(), ErrorView::schema()));
    let mut paths = Map::new();
    for (r, d) in ROUTES.iter().zip(route_docs()) {
        let mut params: Vec<_> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| name.trim_start_matches('*'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        params.extend((d.query)().into_iter().map(|p| {
            serde_json::to_value(p)
                .unwrap_or_else(|e| json!({"description": format!("parameter error: {e}")}))
        }));
        let mut responses = Map::new();
        for (status, body) in &d.responses {
            let mut resp = json!({"description": status_text(*status)});
            if let Some(c) = content(body(&mut components)) {
                resp["content"] = c;
            }
            responses.insert(status.to_string(), resp);
        }
        responses.insert("400".into(), error_response("bad input, named in `error`"));
        let mut op = json!({"summary": r.summary, "parameters": params});
        if let Some(c) = content((d.request)(&mut components)) {
            op["requestBody"] = json!({"required": true, "content": c});
        }
        if let Some(p) = r.permission {
            op["security"] = json!([{"bearer": []}]);
            op["x-permission"] = json!(p);
            responses.insert(
                "401".into(),
                error_response("missing or invalid credential (`reason`)"),
            );
            responses.insert(
                "403".into(),
                error_response("the permission named in `permission` is required"),
            );
        } else {
            op["security"] = json!([]);
        }
        op["responses"] = Value::Object(responses);
        // A catch-all segment (`{*id}`: a secret path) is an ordinary parameter there.
        let entry = paths
            .entry(r.path.replace("{*", "{"))
            .or_insert_with(|| json!({}));
        entry[r.method.to_ascii_lowercase()] = op;
    }
    let schemas: BTreeMap<String, Value> = components
        .into_iter()
        .map(|(name, s)| (name, schema_json(s)))
        .collect();
    json!({
        "openapi": "3.1.0",
        "info": {"title": "aragora", "version": env!("CARGO_PKG_VERSION")},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "JWT access token or API key (ara_...)"}},
            "schemas": schemas,
        },
        "paths": paths,
    })
}

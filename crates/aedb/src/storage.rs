//! The storage seam: every file-system call aedb makes for its data (WAL, checkpoints,
//! manifest, backups, restore, the directory lock) goes through a [`Storage`].
//!
//! [`OsStorage`] is `std::fs` (the default). [`FaultStorage`] is a deterministic,
//! in-memory file system for fault tests: it keeps, per file, the bytes a completed
//! `fdatasync` made durable apart from volatile writes, and per directory the
//! entries a directory fsync made durable apart from volatile creates, renames and
//! removes. A seeded [`FaultPlan`] injects EIO, ENOSPC, short writes and fsync
//! failures at a chosen call, and "crashes" at call N: from then on every call
//! fails, and [`FaultStorage::power_loss`] gives the disk as it is after the power
//! comes back (durable state only, optionally with torn sectors at the tails).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// std's mutex, not parking_lot's: it is `RefUnwindSafe`, which `AedbConfig` (and
/// so every `Storage`) must stay for callers that open under `catch_unwind`.
#[derive(Debug, Default)]
struct Mutex<T>(std::sync::Mutex<T>);

impl<T> Mutex<T> {
    fn new(t: T) -> Self {
        Self(std::sync::Mutex::new(t))
    }

    /// A panic while holding the lock leaves a consistent simulated disk (every
    /// change is one assignment), so poisoning is ignored.
    fn lock(&self) -> std::sync::MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How a file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// An existing file, read only.
    Read,
    /// An existing file, read and write.
    Write,
    /// Created, or truncated to zero length if it exists; read and write.
    Create,
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The file name (aedb names its files in ASCII; other names are skipped).
    pub name: String,
    pub is_dir: bool,
}

/// An open file. Positional reads and writes only: the WAL writes at offsets, and
/// sequential users wrap a file in [`SeqFile`].
pub trait StorageFile: Send + Sync + fmt::Debug {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// May write fewer bytes than given (a short write), like `pwrite`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// `fdatasync`: the file's data written so far survives a power loss.
    fn sync_data(&self) -> io::Result<()>;
    /// `fsync`: data and metadata.
    fn sync_all(&self) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;

    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "failed to fill whole buffer",
                    ));
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes all of `buf`, continuing after short writes (a short write followed
    /// by an error returns the error).
    fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_at(buf, offset) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "failed to write whole buffer",
                    ));
                }
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// What a lock attempt found.
pub enum LockAttempt {
    /// Held until the guard is dropped.
    Held(Box<dyn Send + Sync + std::panic::RefUnwindSafe + std::panic::UnwindSafe>),
    /// Someone else holds it; `holder` is what they wrote into the lock file.
    Busy { holder: String },
}

impl fmt::Debug for LockAttempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Held(_) => f.write_str("Held"),
            Self::Busy { holder } => f.debug_struct("Busy").field("holder", holder).finish(),
        }
    }
}

/// Every file-system operation aedb performs on its data. Implementations must be
/// usable from several threads; the calls mirror the POSIX ones they stand for.
pub trait Storage:
    Send + Sync + fmt::Debug + std::panic::RefUnwindSafe + std::panic::UnwindSafe
{
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes an empty directory.
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The entries of a directory, in no particular order.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>>;
    /// fsync of a directory: its entries (creates, renames, removes) survive a
    /// power loss.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Whether `path` exists; an error when that cannot be told.
    fn try_exists(&self, path: &Path) -> io::Result<bool>;

    /// Whether `path` exists (false when that cannot be told).
    fn exists(&self, path: &Path) -> bool {
        self.try_exists(path).unwrap_or(false)
    }
    /// An exclusive, advisory lock on the file at `path` (created when
    /// `record_pid`, which also writes our pid into it).
    fn try_lock(&self, path: &Path, record_pid: bool) -> io::Result<LockAttempt>;

    /// Last modification time, where the storage knows one.
    fn modified(&self, path: &Path) -> Option<std::time::SystemTime> {
        let _ = path;
        None
    }

    /// Whether aedb may call this storage from its background threads (segment
    /// preparation, the flusher, the checkpointer). A simulated disk that must
    /// replay the same calls in the same order for a seed says no: segments are
    /// then prepared inline, and flushing and checkpoints happen only when the
    /// caller asks (commits with `Durable` finality, `checkpoint()`, close).
    fn background_io(&self) -> bool {
        true
    }

    /// The whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let f = self.open(path, OpenMode::Read)?;
        let len = usize::try_from(f.len()?).map_err(io::Error::other)?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }

    /// Creates or truncates `path` with `bytes` (not synced).
    fn write(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let f = self.open(path, OpenMode::Create)?;
        f.write_all_at(bytes, 0)
    }
}

/// A file read or written front to back (checkpoints, backups, the manifest).
#[derive(Debug)]
pub struct SeqFile {
    pub file: Box<dyn StorageFile>,
    pub pos: u64,
}

impl SeqFile {
    pub fn new(file: Box<dyn StorageFile>) -> Self {
        Self { file, pos: 0 }
    }
}

impl io::Read for SeqFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl io::Write for SeqFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The real file system (`std::fs`).
#[derive(Clone, Copy, Debug, Default)]
pub struct OsStorage;

#[derive(Debug)]
struct OsFile(std::fs::File);

impl StorageFile for OsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.0, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::write_at(&self.0, buf, offset)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl Storage for OsStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
        let mut o = std::fs::OpenOptions::new();
        match mode {
            OpenMode::Read => o.read(true),
            OpenMode::Write => o.read(true).write(true),
            OpenMode::Create => o.read(true).write(true).create(true).truncate(true),
        };
        Ok(Box::new(OsFile(o.open(path)?)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        // Owner-only, like the files in them: data, checkpoints and backups
        // are the database's alone (the umask may narrow it further).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(path)? {
            let e = e?;
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            out.push(DirEntry {
                name,
                is_dir: e.file_type()?.is_dir(),
            });
        }
        Ok(out)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }
    fn try_exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }
    fn modified(&self, path: &Path) -> Option<std::time::SystemTime> {
        std::fs::metadata(path).and_then(|m| m.modified()).ok()
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn try_lock(&self, path: &Path, record_pid: bool) -> io::Result<LockAttempt> {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(record_pid)
            .create(record_pid)
            .truncate(false)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Ok(LockAttempt::Busy { holder });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        if record_pid {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(std::process::id().to_string().as_bytes())?;
        }
        // Dropping the file releases the lock.
        Ok(LockAttempt::Held(Box::new(file)))
    }
}

/// `create_dir_all`, then fsyncs the parent of every directory it created (top
/// down), so the new directories survive a power loss with what is put in them.
/// The parents of directories that already existed are fsynced too, best effort:
/// an earlier call may have created one and failed before its parent was synced,
/// and an existing directory is not yet a durable one. Their errors are ignored
/// (they may be outside what this process may sync).
pub fn create_dir_all_durable(fs: &dyn Storage, path: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = path.ancestors().take_while(|p| !fs.exists(p)).collect();
    let existing = path.ancestors().skip(missing.len());
    let parents: Vec<&Path> = existing.filter(|p| !p.as_os_str().is_empty()).collect();
    for dir in parents.iter().rev() {
        let _ = fs.sync_dir(dir);
    }
    if missing.is_empty() {
        return Ok(());
    }
    fs.create_dir_all(path)?;
    for dir in missing.iter().rev() {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs.sync_dir(parent)?;
        }
    }
    Ok(())
}

/// The default storage.
pub fn os() -> Arc<dyn Storage> {
    Arc::new(OsStorage)
}

// ---------------------------------------------------------------------------
// FaultStorage

/// A fault [`FaultStorage`] injects once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The call fails with EIO (any call).
    Eio,
    /// The first call that allocates space (create, write, set_len) fails with ENOSPC.
    Enospc,
    /// The first write writes only a prefix; the write after it fails with ENOSPC.
    ShortWrite,
    /// The first fsync (file or directory) fails with EIO; nothing more becomes durable.
    SyncFail,
}

/// What goes wrong, and when, counted in storage calls from 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// A fault injected at (or, for the kinds that wait for a call of theirs, from)
    /// call N.
    pub fault: Option<(u64, FaultKind)>,
    /// Power is lost at call N: it and every later call fail.
    pub crash_at: Option<u64>,
}

type NodeId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    File(NodeId),
    Dir(NodeId),
}

#[derive(Clone, Debug, Default)]
struct SimFile {
    data: Vec<u8>,
    /// What the last completed fsync made durable.
    durable: Vec<u8>,
}

#[derive(Clone, Debug, Default)]
struct SimDir {
    live: BTreeMap<String, Node>,
    /// What the last completed directory fsync made durable.
    durable: BTreeMap<String, Node>,
}

#[derive(Clone, Debug)]
struct SimFs {
    files: HashMap<NodeId, SimFile>,
    dirs: HashMap<NodeId, SimDir>,
    next: NodeId,
    locks: HashSet<PathBuf>,
}

const ROOT: NodeId = 0;

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file or directory", path.display()),
    )
}

fn names(path: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(
                n.to_str()
                    .ok_or_else(|| io::Error::other("non-UTF-8 path"))?
                    .to_string(),
            ),
            Component::ParentDir => {
                out.pop();
            }
            Component::Prefix(_) => return Err(io::Error::other("path prefix")),
        }
    }
    Ok(out)
}

impl SimFs {
    fn new() -> Self {
        let mut dirs = HashMap::new();
        dirs.insert(ROOT, SimDir::default());
        Self {
            files: HashMap::new(),
            dirs,
            next: ROOT + 1,
            locks: HashSet::new(),
        }
    }

    fn id(&mut self) -> NodeId {
        self.next += 1;
        self.next
    }

    fn lookup(&self, path: &Path) -> io::Result<Node> {
        let mut node = Node::Dir(ROOT);
        for n in names(path)? {
            let Node::Dir(d) = node else {
                return Err(not_found(path));
            };
            node = *self.dirs[&d].live.get(&n).ok_or_else(|| not_found(path))?;
        }
        Ok(node)
    }

    /// The directory holding `path`, and its last component.
    fn parent(&self, path: &Path) -> io::Result<(NodeId, String)> {
        let mut n = names(path)?;
        let name = n
            .pop()
            .ok_or_else(|| io::Error::other("the root has no parent"))?;
        let parent: PathBuf = std::iter::once("/".to_string()).chain(n).collect();
        match self.lookup(&parent)? {
            Node::Dir(d) => Ok((d, name)),
            Node::File(_) => Err(not_found(path)),
        }
    }

    fn file_mut(&mut self, id: NodeId) -> &mut SimFile {
        self.files.entry(id).or_default()
    }

    fn create_dir_all(&mut self, path: &Path) -> io::Result<()> {
        let mut d = ROOT;
        for n in names(path)? {
            let next = self.dirs[&d].live.get(&n).copied();
            d = match next {
                Some(Node::Dir(c)) => c,
                Some(Node::File(_)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{}: a file is in the way", path.display()),
                    ));
                }
                None => {
                    let c = self.id();
                    self.dirs.insert(c, SimDir::default());
                    self.dirs.entry(d).or_default().live.insert(n, Node::Dir(c));
                    c
                }
            };
        }
        Ok(())
    }

    /// The disk after a power loss: every directory's durable entries, every
    /// file's durable bytes; with `torn`, some sectors of each volatile tail too.
    fn durable_image(&self, mut torn: Option<&mut Rng>) -> SimFs {
        let mut out = SimFs::new();
        let mut todo = vec![(ROOT, ROOT)];
        while let Some((old, new)) = todo.pop() {
            let entries = self.dirs[&old].durable.clone();
            for (name, node) in entries {
                let copied = match node {
                    Node::Dir(d) => {
                        let c = out.id();
                        out.dirs.insert(c, SimDir::default());
                        todo.push((d, c));
                        Node::Dir(c)
                    }
                    Node::File(f) => {
                        let c = out.id();
                        let file = self.files.get(&f).cloned().unwrap_or_default();
                        let mut data = file.durable.clone();
                        if let Some(rng) = torn.as_deref_mut() {
                            tear(&mut data, &file.data, rng);
                        }
                        out.files.insert(
                            c,
                            SimFile {
                                durable: data.clone(),
                                data,
                            },
                        );
                        Node::File(c)
                    }
                };
                let dir = out.dirs.entry(new).or_default();
                dir.live.insert(name.clone(), copied);
                dir.durable.insert(name, copied);
            }
        }
        out
    }
}

const SECTOR: usize = 512;

/// Applies part of the volatile content `live` onto the durable `data`, in 512-byte
/// sectors: none, a prefix of the differing sectors, or any subset of them (the
/// sectors of one write reach the disk in any order); then maybe one more sector
/// whose changed bytes are garbage or zeros (a sector torn mid-write).
fn tear(data: &mut Vec<u8>, live: &[u8], rng: &mut Rng) {
    let len = data.len().max(live.len());
    let differs: Vec<usize> = (0..len.div_ceil(SECTOR))
        .filter(|s| {
            let r = s * SECTOR..((s + 1) * SECTOR).min(len);
            let a = data.get(r.clone()).unwrap_or(&[]);
            let b = live.get(r).unwrap_or(&[]);
            a != b
        })
        .collect();
    if differs.is_empty() {
        return;
    }
    let applied: Vec<usize> = match rng.below(4) {
        0 => Vec::new(),
        1 => {
            let k = rng.below(differs.len() as u64 + 1) as usize;
            differs[..k].to_vec()
        }
        _ => differs
            .iter()
            .copied()
            .filter(|_| rng.below(2) == 0)
            .collect(),
    };
    let torn_sector = (rng.below(2) == 0)
        .then(|| differs.iter().copied().find(|s| !applied.contains(s)))
        .flatten();
    for &s in &applied {
        let end = ((s + 1) * SECTOR).min(live.len());
        if end <= s * SECTOR {
            continue;
        }
        if data.len() < end {
            data.resize(end, 0);
        }
        data[s * SECTOR..end].copy_from_slice(&live[s * SECTOR..end]);
    }
    // Only the bytes being changed are torn: a sector write never alters the bytes
    // it rewrites with their old values ("powersafe overwrite", as SQLite assumes),
    // so a frame written next to a segment header cannot destroy the header.
    if let Some(s) = torn_sector {
        let end = ((s + 1) * SECTOR).min(live.len());
        if end > s * SECTOR {
            if data.len() < end {
                data.resize(end, 0);
            }
            let zeros = rng.below(2) == 0;
            for j in s * SECTOR..end {
                if data[j] != live[j] {
                    data[j] = if zeros { 0 } else { rng.next() as u8 };
                }
            }
        }
    }
}

/// splitmix64: small, seedable, and the same on every platform.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

#[derive(Debug)]
struct Sim {
    fs: SimFs,
    plan: FaultPlan,
    calls: u64,
    crashed: bool,
    /// The fault fired (kinds that wait for a call of theirs fire once).
    fired: bool,
    /// A short write happened: the next write fails with ENOSPC.
    after_short: bool,
    /// Every call: what it was and on which path, in order (its index is its call
    /// number).
    trace: Vec<(&'static str, PathBuf)>,
    injected: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Alloc,
    Write,
    Sync,
    Meta,
}

/// The calls' names as `'static` (they are all literals in this file).
fn what_name(what: &str) -> &'static str {
    const NAMES: [&str; 14] = [
        "read",
        "write",
        "fdatasync",
        "set_len",
        "len",
        "open",
        "rename",
        "unlink",
        "rmdir",
        "rm -r",
        "mkdir -p",
        "readdir",
        "fsync dir",
        "stat",
    ];
    NAMES
        .iter()
        .find(|n| **n == what)
        .copied()
        .unwrap_or("flock")
}

fn eio(what: &str) -> io::Error {
    io::Error::new(
        io::Error::from_raw_os_error(5).kind(),
        format!("injected EIO ({what})"),
    )
}

impl Sim {
    /// Counts a call and decides whether it fails: after the crash always; at the
    /// planned fault once.
    fn enter(&mut self, op: Op, what: &str, path: &Path) -> io::Result<()> {
        let n = self.calls;
        self.calls += 1;
        self.trace.push((what_name(what), path.to_path_buf()));
        if self.crashed || self.plan.crash_at.is_some_and(|c| n >= c) {
            if !self.crashed {
                self.injected.push(format!(
                    "power lost at call {n} ({what} {})",
                    path.display()
                ));
            }
            self.crashed = true;
            return Err(io::Error::other("simulated power loss: the machine is off"));
        }
        if self.after_short && op == Op::Write {
            self.after_short = false;
            self.injected.push(format!(
                "ENOSPC after a short write at call {n} ({what} {})",
                path.display()
            ));
            return Err(io::Error::from_raw_os_error(28));
        }
        let Some((at, kind)) = self.plan.fault else {
            return Ok(());
        };
        if self.fired || n < at {
            return Ok(());
        }
        let fire = match kind {
            FaultKind::Eio => true,
            FaultKind::Enospc => matches!(op, Op::Alloc | Op::Write),
            FaultKind::ShortWrite => op == Op::Write,
            FaultKind::SyncFail => op == Op::Sync,
        };
        if !fire {
            return Ok(());
        }
        self.fired = true;
        self.injected
            .push(format!("{kind:?} at call {n} ({what} {})", path.display()));
        match kind {
            FaultKind::Eio | FaultKind::SyncFail => Err(eio(what)),
            FaultKind::Enospc => Err(io::Error::from_raw_os_error(28)),
            // The caller performs the short write itself.
            FaultKind::ShortWrite => {
                self.after_short = true;
                Err(io::Error::new(io::ErrorKind::Interrupted, "short write"))
            }
        }
    }
}

/// A deterministic in-memory file system with power-loss semantics and seeded
/// faults. Cheap to clone (clones share the disk).
#[derive(Clone)]
pub struct FaultStorage {
    sim: Arc<Mutex<Sim>>,
}

impl fmt::Debug for FaultStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.sim.lock();
        f.debug_struct("FaultStorage")
            .field("plan", &s.plan)
            .field("calls", &s.calls)
            .field("crashed", &s.crashed)
            .finish()
    }
}

impl Default for FaultStorage {
    fn default() -> Self {
        Self::new(FaultPlan::default())
    }
}

impl FaultStorage {
    /// An empty disk (only `/`) with `plan`.
    pub fn new(plan: FaultPlan) -> Self {
        Self::from_fs(SimFs::new(), plan)
    }

    fn from_fs(fs: SimFs, plan: FaultPlan) -> Self {
        Self {
            sim: Arc::new(Mutex::new(Sim {
                fs,
                plan,
                calls: 0,
                crashed: false,
                fired: false,
                after_short: false,
                trace: Vec::new(),
                injected: Vec::new(),
            })),
        }
    }

    /// Storage calls made so far.
    pub fn calls(&self) -> u64 {
        self.sim.lock().calls
    }

    /// Indexes of the calls that were fsyncs: power lost at one of them is power
    /// lost before that fsync completed, the moment that decides what survives.
    pub fn sync_calls(&self) -> Vec<(u64, PathBuf)> {
        self.trace()
            .into_iter()
            .enumerate()
            .filter(|(_, (what, _))| what.starts_with("fsync") || *what == "fdatasync")
            .map(|(n, (_, p))| (n as u64, p))
            .collect()
    }

    /// Every call so far (its index is its call number): what and on which path.
    pub fn trace(&self) -> Vec<(&'static str, PathBuf)> {
        self.sim.lock().trace.clone()
    }

    pub fn crashed(&self) -> bool {
        self.sim.lock().crashed
    }

    /// What was injected, in order (the fault, the crash).
    pub fn injected(&self) -> Vec<String> {
        self.sim.lock().injected.clone()
    }

    /// Cuts the power now: every later call fails.
    pub fn crash_now(&self) {
        let mut s = self.sim.lock();
        if !s.crashed {
            let n = s.calls;
            s.injected.push(format!("power lost after call {n}"));
        }
        s.crashed = true;
    }

    /// The disk after the power comes back: only what was made durable (and, with
    /// `torn_seed`, some sectors of each file's volatile tail, see `tear`). A new,
    /// fault-free storage; this one is unchanged.
    pub fn power_loss(&self, torn_seed: Option<u64>) -> FaultStorage {
        let s = self.sim.lock();
        let mut rng = torn_seed.map(Rng::new);
        Self::from_fs(s.fs.durable_image(rng.as_mut()), FaultPlan::default())
    }

    /// A fault-free copy of the disk as it is now (volatile state included).
    pub fn fork(&self) -> FaultStorage {
        let s = self.sim.lock();
        Self::from_fs(s.fs.clone(), FaultPlan::default())
    }

    /// Reads a whole file without counting a call (for tests).
    pub fn peek(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.sim.lock();
        match s.fs.lookup(path).ok()? {
            Node::File(id) => Some(
                s.fs.files
                    .get(&id)
                    .map(|f| f.data.clone())
                    .unwrap_or_default(),
            ),
            Node::Dir(_) => None,
        }
    }

    /// Replaces a whole file's content, durable at once (for tests that damage a disk).
    pub fn poke(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut s = self.sim.lock();
        let Node::File(id) = s.fs.lookup(path)? else {
            return Err(not_found(path));
        };
        let f = s.fs.file_mut(id);
        f.data = bytes.to_vec();
        f.durable = bytes.to_vec();
        Ok(())
    }

    fn with<T>(
        &self,
        op: Op,
        what: &str,
        path: &Path,
        f: impl FnOnce(&mut SimFs) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut s = self.sim.lock();
        s.enter(op, what, path)?;
        f(&mut s.fs)
    }
}

#[derive(Debug)]
struct SimHandle {
    sim: Arc<Mutex<Sim>>,
    id: NodeId,
    path: PathBuf,
    writable: bool,
}

impl SimHandle {
    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{}: opened read-only", self.path.display()),
            ))
        }
    }
}

impl StorageFile for SimHandle {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut s = self.sim.lock();
        s.enter(Op::Read, "read", &self.path)?;
        let f = s.fs.file_mut(self.id);
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(f.data.len());
        let n = buf.len().min(f.data.len() - start);
        buf[..n].copy_from_slice(&f.data[start..start + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.check_writable()?;
        let mut s = self.sim.lock();
        let mut len = buf.len();
        match s.enter(Op::Write, "write", &self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => len = (len / 2).max(1),
            Err(e) => return Err(e),
        }
        let at = usize::try_from(offset).map_err(io::Error::other)?;
        let f = s.fs.file_mut(self.id);
        if f.data.len() < at + len {
            f.data.resize(at + len, 0);
        }
        f.data[at..at + len].copy_from_slice(&buf[..len]);
        Ok(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.sim.lock();
        s.enter(Op::Sync, "fdatasync", &self.path)?;
        let f = s.fs.file_mut(self.id);
        f.durable.clone_from(&f.data);
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut s = self.sim.lock();
        s.enter(Op::Alloc, "set_len", &self.path)?;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        s.fs.file_mut(self.id).data.resize(len, 0);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let mut s = self.sim.lock();
        s.enter(Op::Meta, "len", &self.path)?;
        Ok(s.fs.file_mut(self.id).data.len() as u64)
    }
}

struct SimLock {
    sim: Arc<Mutex<Sim>>,
    path: PathBuf,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        self.sim.lock().fs.locks.remove(&self.path);
    }
}

impl Storage for FaultStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
        let op = if mode == OpenMode::Create {
            Op::Alloc
        } else {
            Op::Meta
        };
        let id = self.with(op, "open", path, |fs| match (fs.lookup(path), mode) {
            (Ok(Node::File(id)), OpenMode::Create) => {
                fs.file_mut(id).data.clear();
                Ok(id)
            }
            (Ok(Node::File(id)), _) => Ok(id),
            (Ok(Node::Dir(_)), _) => Err(io::Error::other(format!(
                "{}: is a directory",
                path.display()
            ))),
            (Err(_), OpenMode::Create) => {
                let (dir, name) = fs.parent(path)?;
                let id = fs.id();
                fs.files.insert(id, SimFile::default());
                fs.dirs
                    .entry(dir)
                    .or_default()
                    .live
                    .insert(name, Node::File(id));
                Ok(id)
            }
            (Err(e), _) => Err(e),
        })?;
        Ok(Box::new(SimHandle {
            sim: self.sim.clone(),
            id,
            path: path.to_path_buf(),
            writable: mode != OpenMode::Read,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.with(Op::Meta, "rename", from, |fs| {
            let node = fs.lookup(from)?;
            let (fd, fname) = fs.parent(from)?;
            let (td, tname) = fs.parent(to)?;
            if let (Node::Dir(_), Ok(Node::Dir(existing))) = (node, fs.lookup(to))
                && !fs.dirs[&existing].live.is_empty()
            {
                return Err(io::Error::other(format!(
                    "{}: directory not empty",
                    to.display()
                )));
            }
            fs.dirs.entry(fd).or_default().live.remove(&fname);
            fs.dirs.entry(td).or_default().live.insert(tname, node);
            Ok(())
        })
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.with(Op::Meta, "unlink", path, |fs| {
            let Node::File(_) = fs.lookup(path)? else {
                return Err(io::Error::other(format!(
                    "{}: is a directory",
                    path.display()
                )));
            };
            let (d, name) = fs.parent(path)?;
            fs.dirs.entry(d).or_default().live.remove(&name);
            Ok(())
        })
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.with(Op::Meta, "rmdir", path, |fs| {
            let Node::Dir(id) = fs.lookup(path)? else {
                return Err(io::Error::other(format!(
                    "{}: not a directory",
                    path.display()
                )));
            };
            if !fs.dirs[&id].live.is_empty() {
                return Err(io::Error::other(format!(
                    "{}: directory not empty",
                    path.display()
                )));
            }
            let (d, name) = fs.parent(path)?;
            fs.dirs.entry(d).or_default().live.remove(&name);
            Ok(())
        })
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        // The subtree becomes unreachable; its own directories are never synced again.
        self.with(Op::Meta, "rm -r", path, |fs| {
            fs.lookup(path)?;
            let (d, name) = fs.parent(path)?;
            fs.dirs.entry(d).or_default().live.remove(&name);
            Ok(())
        })
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.with(Op::Alloc, "mkdir -p", path, |fs| fs.create_dir_all(path))
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        self.with(Op::Read, "readdir", path, |fs| match fs.lookup(path)? {
            Node::Dir(d) => Ok(fs.dirs[&d]
                .live
                .iter()
                .map(|(name, n)| DirEntry {
                    name: name.clone(),
                    is_dir: matches!(n, Node::Dir(_)),
                })
                .collect()),
            Node::File(_) => Err(io::Error::other(format!(
                "{}: not a directory",
                path.display()
            ))),
        })
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.with(Op::Sync, "fsync dir", path, |fs| match fs.lookup(path)? {
            Node::Dir(d) => {
                let dir = fs.dirs.entry(d).or_default();
                dir.durable = dir.live.clone();
                Ok(())
            }
            Node::File(_) => Err(io::Error::other(format!(
                "{}: not a directory",
                path.display()
            ))),
        })
    }

    fn try_exists(&self, path: &Path) -> io::Result<bool> {
        self.with(Op::Meta, "stat", path, |fs| Ok(fs.lookup(path).is_ok()))
    }

    fn try_lock(&self, path: &Path, record_pid: bool) -> io::Result<LockAttempt> {
        let op = if record_pid { Op::Alloc } else { Op::Meta };
        let held = self.with(op, "flock", path, |fs| {
            if record_pid && fs.lookup(path).is_err() {
                let (dir, name) = fs.parent(path)?;
                let id = fs.id();
                fs.files.insert(id, SimFile::default());
                fs.dirs
                    .entry(dir)
                    .or_default()
                    .live
                    .insert(name, Node::File(id));
            }
            Ok(!fs.locks.insert(path.to_path_buf()))
        })?;
        if held {
            return Ok(LockAttempt::Busy {
                holder: "this process (simulated storage)".into(),
            });
        }
        Ok(LockAttempt::Held(Box::new(SimLock {
            sim: self.sim.clone(),
            path: path.to_path_buf(),
        })))
    }

    fn background_io(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn directories_the_engine_creates_are_owner_only() -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir()?;
        let nested = root.path().join("backups").join("full-001");
        create_dir_all_durable(&OsStorage, &nested)?;
        for dir in [root.path().join("backups"), nested] {
            let mode = std::fs::metadata(&dir)?.permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", dir.display());
        }
        Ok(())
    }

    #[test]
    fn power_loss_keeps_only_synced_bytes_and_synced_entries() -> io::Result<()> {
        let fs = FaultStorage::default();
        fs.create_dir_all(&p("/d"))?;
        fs.sync_dir(&p("/"))?;
        let f = fs.open(&p("/d/a"), OpenMode::Create)?;
        f.write_all_at(b"durable", 0)?;
        f.sync_data()?;
        f.write_all_at(b" and volatile", 7)?;
        // The entry is not durable yet: the file vanishes.
        assert!(fs.power_loss(None).read(&p("/d/a")).is_err());
        fs.sync_dir(&p("/d"))?;
        assert_eq!(fs.power_loss(None).read(&p("/d/a"))?, b"durable");
        // A rename over it is volatile until the directory is synced.
        let t = fs.open(&p("/d/a.tmp"), OpenMode::Create)?;
        t.write_all_at(b"new", 0)?;
        t.sync_data()?;
        fs.rename(&p("/d/a.tmp"), &p("/d/a"))?;
        assert_eq!(fs.read(&p("/d/a"))?, b"new");
        assert_eq!(fs.power_loss(None).read(&p("/d/a"))?, b"durable");
        fs.sync_dir(&p("/d"))?;
        assert_eq!(fs.power_loss(None).read(&p("/d/a"))?, b"new");
        Ok(())
    }

    #[test]
    fn crash_fails_every_later_call_and_faults_fire_once() -> io::Result<()> {
        let fs = FaultStorage::new(FaultPlan {
            fault: Some((1, FaultKind::SyncFail)),
            crash_at: Some(5),
        });
        let f = fs.open(&p("/a"), OpenMode::Create)?; // call 0
        f.write_all_at(b"x", 0)?; // 1: not a sync, the fault waits
        assert!(f.sync_data().is_err()); // 2: fires
        f.sync_data()?; // 3: once only
        f.write_all_at(b"y", 1)?; // 4
        assert!(f.write_all_at(b"z", 2).is_err()); // 5: power lost
        assert!(!fs.exists(&p("/a")) && fs.crashed());
        Ok(())
    }

    #[test]
    fn short_write_then_enospc() -> io::Result<()> {
        let fs = FaultStorage::new(FaultPlan {
            fault: Some((0, FaultKind::ShortWrite)),
            crash_at: None,
        });
        let f = fs.open(&p("/a"), OpenMode::Create)?;
        assert_eq!(f.write_at(b"abcd", 0)?, 2);
        let e = f.write_all_at(b"cd", 2).expect_err("ENOSPC follows");
        assert_eq!(e.raw_os_error(), Some(28));
        assert_eq!(fs.read(&p("/a"))?, b"ab");
        Ok(())
    }

    #[test]
    fn torn_tail_is_whole_sectors_of_the_volatile_data_or_garbage() -> io::Result<()> {
        let fs = FaultStorage::default();
        let f = fs.open(&p("/a"), OpenMode::Create)?;
        f.write_all_at(&[1u8; 1024], 0)?;
        f.sync_data()?;
        fs.sync_dir(&p("/"))?;
        f.write_all_at(&[2u8; 2048], 1024)?;
        let mut shapes = HashSet::new();
        for seed in 0..64 {
            let data = fs.power_loss(Some(seed)).read(&p("/a"))?;
            assert_eq!(&data[..1024], &[1u8; 1024][..], "durable bytes survive");
            assert_eq!(data.len() % SECTOR, 0);
            shapes.insert(data.len());
        }
        assert!(shapes.len() > 1, "tails differ between seeds");
        Ok(())
    }
}

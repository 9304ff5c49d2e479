//! Appends frames and makes them durable with group commit.
//!
//! Committers append encoded frames to an in-memory buffer while holding the engine's
//! commit lock (so buffer order is LSN order). Whoever needs durability becomes the
//! *leader* if no fsync is running: it takes the whole buffer, writes it with one
//! `pwrite`, calls `fdatasync`, and publishes the new durable LSN. Committers that
//! arrive during that fsync wait and are covered together by the next leader, so
//! N concurrent durable commits cost about N / batch fsyncs, and a lone writer pays
//! exactly one per commit.
//!
//! Segments are preallocated and zero-filled (by a background thread for all but
//! the first), so `fdatasync` after a write never has to journal a size change.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use super::format::{
    ChainHash, FORMAT_VERSION, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN, SegmentHeader, encode_frame,
    segment_file_name,
};
use crate::error::AedbError;

/// Pending bytes above which a `Visible` committer wakes the flusher early.
pub(crate) const SOFT_BUFFER_BYTES: usize = 4 << 20;
/// Pending bytes above which a committer writes the buffer out itself: the bound on
/// memory held by not-yet-written commits.
pub(crate) const HARD_BUFFER_BYTES: usize = 32 << 20;
/// Size of the first segment of a new database: small so that creating one is quick.
const INITIAL_SEGMENT_BYTES: u64 = 4 << 20;

/// Where the writer continues after recovery.
#[derive(Debug, Clone)]
pub(crate) struct WriterPosition {
    pub segment_index: u64,
    /// Offset in that segment where the next frame goes.
    pub offset: u64,
    pub last_lsn: u64,
    pub chain_head: ChainHash,
}

struct Pending {
    bytes: Vec<u8>,
    last_lsn: u64,
    chain_head: ChainHash,
    /// Offset in the current segment where the next appended frame will land.
    segment_offset: u64,
    segment_capacity: u64,
    segment_index: u64,
}

struct Io {
    file: File,
    path: PathBuf,
    /// Offset up to which the buffer has been written to `file`.
    written_offset: u64,
    spare: Vec<u8>,
}

#[derive(Default)]
struct SyncState {
    durable_lsn: u64,
    written_lsn: u64,
    syncing: bool,
    failed: Option<String>,
    fsyncs: u64,
}

pub(crate) struct WalWriter {
    dir: PathBuf,
    segment_bytes: u64,
    pending: Mutex<Pending>,
    io: Mutex<Io>,
    sync: Mutex<SyncState>,
    synced: Condvar,
    preparing: Mutex<Option<JoinHandle<Result<PathBuf, AedbError>>>>,
}

impl std::fmt::Debug for WalWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalWriter").field("dir", &self.dir).finish()
    }
}

fn prep_path(dir: &Path) -> PathBuf {
    dir.join("wal-next.prep")
}

impl WalWriter {
    /// Creates the first segment of a new database.
    pub fn create(dir: &Path, segment_bytes: u64) -> Result<Self, AedbError> {
        let header = SegmentHeader {
            version: FORMAT_VERSION,
            flags: 0,
            index: 1,
            first_lsn: 1,
            prev_hash: [0; 32],
            salt: [0; 16],
        };
        let size = segment_bytes.min(INITIAL_SEGMENT_BYTES);
        let tmp = dir.join(format!("{}.tmp", segment_file_name(1)));
        zero_filled_file(&tmp, size)?;
        let path = install_segment(dir, &tmp, &header)?;
        let pos = WriterPosition {
            segment_index: 1,
            offset: SEGMENT_HEADER_LEN as u64,
            last_lsn: 0,
            chain_head: [0; 32],
        };
        Self::resume_at(dir, segment_bytes, &path, pos)
    }

    /// Continues an existing log at `pos` (from recovery).
    pub fn resume(dir: &Path, segment_bytes: u64, pos: WriterPosition) -> Result<Self, AedbError> {
        let path = dir.join(segment_file_name(pos.segment_index));
        Self::resume_at(dir, segment_bytes, &path, pos)
    }

    fn resume_at(
        dir: &Path,
        segment_bytes: u64,
        path: &Path,
        pos: WriterPosition,
    ) -> Result<Self, AedbError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| AedbError::io(path, e))?;
        let capacity = file.metadata().map_err(|e| AedbError::io(path, e))?.len();
        let w = Self {
            dir: dir.to_path_buf(),
            segment_bytes,
            pending: Mutex::new(Pending {
                bytes: Vec::with_capacity(64 * 1024),
                last_lsn: pos.last_lsn,
                chain_head: pos.chain_head,
                segment_offset: pos.offset,
                segment_capacity: capacity,
                segment_index: pos.segment_index,
            }),
            io: Mutex::new(Io {
                file,
                path: path.to_path_buf(),
                written_offset: pos.offset,
                spare: Vec::with_capacity(64 * 1024),
            }),
            sync: Mutex::new(SyncState {
                durable_lsn: pos.last_lsn,
                written_lsn: pos.last_lsn,
                ..SyncState::default()
            }),
            synced: Condvar::new(),
            preparing: Mutex::new(None),
        };
        w.start_preparing_next();
        Ok(w)
    }

    fn start_preparing_next(&self) {
        let path = prep_path(&self.dir);
        let size = self.segment_bytes;
        let handle = std::thread::Builder::new()
            .name("aedb-wal-prep".into())
            .spawn(move || zero_filled_file(&path, size).map(|()| path));
        *self.preparing.lock() = handle.ok();
    }

    /// Fails fast once an earlier write or fsync failed: after a failed fsync the
    /// page cache can no longer be trusted to match the file.
    pub fn check_healthy(&self) -> Result<(), AedbError> {
        match &self.sync.lock().failed {
            Some(e) => Err(AedbError::Poisoned(e.clone())),
            None => Ok(()),
        }
    }

    /// Appends a frame for `lsn`. Must be called with LSNs in order (the engine holds
    /// its commit lock). Returns the pending-buffer size after the append.
    pub fn append(&self, lsn: u64, payload: &[u8]) -> Result<usize, AedbError> {
        let frame_len = (FRAME_HEADER_LEN + payload.len()) as u64;
        let needs_rotation = {
            let p = self.pending.lock();
            assert_eq!(p.last_lsn + 1, lsn, "WAL appends must be in LSN order");
            p.segment_offset + frame_len > p.segment_capacity
        };
        if needs_rotation {
            self.rotate(lsn, frame_len)?;
        }
        let mut p = self.pending.lock();
        let prev = p.chain_head;
        p.chain_head = encode_frame(&mut p.bytes, &prev, lsn, payload);
        p.last_lsn = lsn;
        p.segment_offset += frame_len;
        Ok(p.bytes.len())
    }

    /// Closes the current segment (everything in it made durable) and continues in a
    /// new one that starts with `first_lsn`.
    fn rotate(&self, first_lsn: u64, frame_len: u64) -> Result<(), AedbError> {
        let last = self.pending.lock().last_lsn;
        self.wait_durable(last)?;
        let prepared = self.preparing.lock().take();
        let prepared_path = match prepared.map(|h| h.join()) {
            Some(Ok(Ok(path))) => Some(path),
            Some(Ok(Err(e))) => {
                tracing::warn!(error = %e, "background segment preparation failed; preparing inline");
                None
            }
            Some(Err(_)) | None => None,
        };
        let (index, prev_hash) = {
            let p = self.pending.lock();
            (p.segment_index + 1, p.chain_head)
        };
        let needed = SEGMENT_HEADER_LEN as u64 + frame_len;
        let tmp = match prepared_path {
            Some(p) if self.segment_bytes >= needed => p,
            _ => {
                let tmp = prep_path(&self.dir);
                zero_filled_file(&tmp, self.segment_bytes.max(needed))?;
                tmp
            }
        };
        let header = SegmentHeader {
            version: FORMAT_VERSION,
            flags: 0,
            index,
            first_lsn,
            prev_hash,
            salt: [0; 16],
        };
        let path = install_segment(&self.dir, &tmp, &header)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| AedbError::io(&path, e))?;
        let capacity = file.metadata().map_err(|e| AedbError::io(&path, e))?.len();
        {
            let mut io = self.io.lock();
            io.file = file;
            io.path = path;
            io.written_offset = SEGMENT_HEADER_LEN as u64;
        }
        {
            let mut p = self.pending.lock();
            debug_assert!(p.bytes.is_empty(), "rotation after a full flush");
            p.segment_index = index;
            p.segment_offset = SEGMENT_HEADER_LEN as u64;
            p.segment_capacity = capacity;
        }
        self.start_preparing_next();
        Ok(())
    }

    /// Writes the pending buffer to the segment and, if `sync`, fdatasyncs it.
    /// Returns the highest LSN covered.
    fn flush(&self, sync: bool) -> Result<u64, AedbError> {
        let mut io = self.io.lock();
        let io = &mut *io;
        let upto = {
            let mut p = self.pending.lock();
            std::mem::swap(&mut p.bytes, &mut io.spare);
            p.last_lsn
        };
        if !io.spare.is_empty() {
            io.file
                .write_all_at(&io.spare, io.written_offset)
                .map_err(|e| AedbError::io(&io.path, e))?;
            io.written_offset += io.spare.len() as u64;
            io.spare.clear();
            if io.spare.capacity() > SOFT_BUFFER_BYTES {
                io.spare.shrink_to(64 * 1024);
            }
        }
        if sync {
            io.file
                .sync_data()
                .map_err(|e| AedbError::io(&io.path, e))?;
        }
        Ok(upto)
    }

    /// Returns once every frame up to `lsn` is on stable storage (group commit).
    pub fn wait_durable(&self, lsn: u64) -> Result<(), AedbError> {
        let mut s = self.sync.lock();
        loop {
            if let Some(e) = &s.failed {
                return Err(AedbError::Poisoned(e.clone()));
            }
            if s.durable_lsn >= lsn {
                return Ok(());
            }
            if s.syncing {
                self.synced.wait(&mut s);
                continue;
            }
            s.syncing = true;
            drop(s);
            let result = self.flush(true);
            s = self.sync.lock();
            s.syncing = false;
            match result {
                Ok(upto) => {
                    s.durable_lsn = s.durable_lsn.max(upto);
                    s.written_lsn = s.written_lsn.max(upto);
                    s.fsyncs += 1;
                }
                Err(e) => {
                    tracing::error!(error = %e, "WAL write or fsync failed; refusing further commits");
                    s.failed = Some(e.to_string());
                }
            }
            self.synced.notify_all();
        }
    }

    /// Hands buffered frames to the OS without an fsync (`OsBuffered`, memory bound).
    pub fn write_out(&self) -> Result<(), AedbError> {
        let upto = match self.flush(false) {
            Ok(upto) => upto,
            Err(e) => {
                self.sync.lock().failed = Some(e.to_string());
                self.synced.notify_all();
                return Err(e);
            }
        };
        let mut s = self.sync.lock();
        s.written_lsn = s.written_lsn.max(upto);
        Ok(())
    }

    pub fn last_lsn(&self) -> u64 {
        self.pending.lock().last_lsn
    }

    pub fn durable_lsn(&self) -> u64 {
        self.sync.lock().durable_lsn
    }

    pub fn pending_bytes(&self) -> usize {
        self.pending.lock().bytes.len()
    }

    pub fn fsyncs(&self) -> u64 {
        self.sync.lock().fsyncs
    }

    /// Makes everything durable and stops background preparation.
    pub fn shutdown(&self) -> Result<(), AedbError> {
        let last = self.last_lsn();
        let r = self.wait_durable(last);
        if let Some(h) = self.preparing.lock().take() {
            let _ = h.join();
        }
        r
    }
}

/// Writes a zero-filled file of `size` bytes and fsyncs it.
fn zero_filled_file(path: &Path, size: u64) -> Result<(), AedbError> {
    let mut f = File::create(path).map_err(|e| AedbError::io(path, e))?;
    let chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])
            .map_err(|e| AedbError::io(path, e))?;
        left -= n as u64;
    }
    f.sync_all().map_err(|e| AedbError::io(path, e))
}

/// Writes `header` into the prepared file `tmp` and renames it into place
/// crash-safely (fsync file, rename, fsync directory).
fn install_segment(dir: &Path, tmp: &Path, header: &SegmentHeader) -> Result<PathBuf, AedbError> {
    let f = OpenOptions::new()
        .write(true)
        .open(tmp)
        .map_err(|e| AedbError::io(tmp, e))?;
    f.write_all_at(&header.encode(), 0)
        .map_err(|e| AedbError::io(tmp, e))?;
    f.sync_data().map_err(|e| AedbError::io(tmp, e))?;
    let path = dir.join(segment_file_name(header.index));
    std::fs::rename(tmp, &path).map_err(|e| AedbError::io(&path, e))?;
    sync_dir(dir)?;
    Ok(path)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), AedbError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AedbError::io(dir, e))
}

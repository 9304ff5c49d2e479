//! What the key ring and the migration know of an encrypted collection: where
//! a stored record's envelope is, and how to put a new one in its place. The
//! owner of the records (the secrets service) registers its collection at
//! boot; encryption never names the record type.

use std::fmt;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crypto::{self, EnvelopeHeader};
use crate::store::{Collection, ListQuery, Record, Store, StoreError};

/// A stored record type that carries an envelope.
pub trait Enveloped: Serialize + DeserializeOwned + Clone {
    /// The envelope, hex.
    fn envelope_hex(&self) -> &str;
    /// Replaces the envelope (and whatever names its key).
    fn set_envelope(&mut self, envelope: &[u8], key_id: &str, key_version: u32);
}

/// A collection whose records hold envelopes, seen as stored bytes.
pub trait EncryptedCollection: Send + Sync + fmt::Debug {
    /// The store name (`--store=NAME`).
    fn name(&self) -> &'static str;
    fn collection(&self) -> Collection;
    /// The envelope of a stored record.
    fn envelope(&self, value: &[u8]) -> Result<Vec<u8>, String>;
    /// The stored record with `envelope` (under `key_id`, `key_version`) in
    /// place of its envelope.
    fn reseal(
        &self,
        value: &[u8],
        envelope: &[u8],
        key_id: &str,
        key_version: u32,
    ) -> Result<Vec<u8>, String>;

    /// The header of a stored record's envelope: which key encrypts it,
    /// read without decrypting.
    fn header(&self, value: &[u8]) -> Result<EnvelopeHeader, String> {
        let envelope = self.envelope(value)?;
        crypto::parse_header(&envelope).map_err(|e| e.to_string())
    }
}

/// Reads `collection` in id order, `page_size` records at a time, starting
/// after the id `after`, and hands each non-empty page to `f`. Stops after the
/// first short page, or at the first error. Every scan of an encrypted
/// collection (key usage, dry run, counting, the migration itself) pages the
/// same way, so a record added behind the cursor is never read twice.
pub(super) fn for_each_page<E: From<StoreError>>(
    store: &dyn Store,
    collection: Collection,
    after: Option<&str>,
    page_size: usize,
    mut f: impl FnMut(Vec<(String, Record)>) -> Result<(), E>,
) -> Result<(), E> {
    let mut after = after.map(str::to_string);
    loop {
        let page = store.list(collection, &ListQuery::after(after.as_deref(), page_size))?;
        let n = page.len();
        let Some(last) = page.last().map(|(id, _)| id.clone()) else {
            return Ok(());
        };
        f(page)?;
        if n < page_size {
            return Ok(());
        }
        after = Some(last);
    }
}

/// [`for_each_page`] from the start, one record at a time.
pub(super) fn for_each_stored(
    store: &dyn Store,
    collection: Collection,
    page_size: usize,
    mut f: impl FnMut(&str, &Record),
) -> Result<(), StoreError> {
    for_each_page(store, collection, None, page_size, |page| {
        for (id, rec) in &page {
            f(id, rec);
        }
        Ok(())
    })
}

/// An [`EncryptedCollection`] of JSON records of type `T`.
pub struct JsonEnveloped<T> {
    name: &'static str,
    collection: Collection,
    _record: PhantomData<fn() -> T>,
}

impl<T> JsonEnveloped<T> {
    pub fn new(name: &'static str, collection: Collection) -> Self {
        Self {
            name,
            collection,
            _record: PhantomData,
        }
    }
}

impl<T> fmt::Debug for JsonEnveloped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonEnveloped")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn decode<T: DeserializeOwned>(value: &[u8]) -> Result<T, String> {
    serde_json::from_slice(value).map_err(|e| format!("record does not decode: {e}"))
}

impl<T: Enveloped> EncryptedCollection for JsonEnveloped<T> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn collection(&self) -> Collection {
        self.collection
    }

    fn envelope(&self, value: &[u8]) -> Result<Vec<u8>, String> {
        let r: T = decode(value)?;
        hex::decode(r.envelope_hex()).map_err(|_| "malformed envelope: not hex".to_string())
    }

    fn reseal(
        &self,
        value: &[u8],
        envelope: &[u8],
        key_id: &str,
        key_version: u32,
    ) -> Result<Vec<u8>, String> {
        let mut r: T = decode(value)?;
        r.set_envelope(envelope, key_id, key_version);
        serde_json::to_vec(&r).map_err(|e| format!("record does not encode: {e}"))
    }
}

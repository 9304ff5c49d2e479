//! What the key ring and the migration know of an encrypted collection: where
//! a stored record's envelope is, and how to put a new one in its place. The
//! owner of the records (the secrets service) registers its collection at
//! boot; encryption never names the record type.

use std::fmt;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::store::Collection;

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

//! Shared byte strings and their compact serde form (one length-prefixed blob, not a
//! sequence of u8 elements).
//!
//! A [`Bytes`] of up to [`INLINE_CAP`] bytes is stored inline (no heap allocation, no
//! pointer to chase when an ordered map compares keys); a longer one is an `Arc<[u8]>`
//! shared by its clones. Which form holds a given content is not observable: equality,
//! ordering and hashing are those of the byte content (exactly `[u8]`'s, as `Borrow`
//! requires), so an inline and a shared string with the same bytes are equal.
//!
//! Values use [`SharedBytes`] instead: always one `Arc<[u8]>`, because reads hand values
//! out as `Arc<[u8]>` (an inline value would cost an allocation per read) and a value
//! slot is then 16 bytes rather than 24 in every map leaf.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Longest content stored inline. 22 keeps `Bytes` (and `Option<Bytes>`) at 24 bytes:
/// one tag byte, one length byte and 22 data bytes, the size of the `Arc<[u8]>` fat
/// pointer rounded up to its alignment plus a word.
pub(crate) const INLINE_CAP: usize = 22;

/// An immutable, cheaply cloned byte string; keys (KV keys, encoded primary keys) are
/// stored as these. Values are [`SharedBytes`].
#[derive(Clone)]
pub struct Bytes(Repr);

#[derive(Clone)]
enum Repr {
    /// `data[..len]` is the content; `len <= INLINE_CAP`, the rest is zero.
    Inline { len: u8, data: [u8; INLINE_CAP] },
    /// Content longer than `INLINE_CAP`.
    Shared(Arc<[u8]>),
}

const _: () = assert!(std::mem::size_of::<Bytes>() == 24);
const _: () = assert!(std::mem::size_of::<Option<Bytes>>() == 24);

impl Bytes {
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, data } => &data[..usize::from(*len)],
            Repr::Shared(a) => a,
        }
    }

    /// The content as the public API's `Arc<[u8]>`: a reference-count increment for a
    /// shared string, one small allocation for an inline one.
    #[inline]
    pub fn to_arc(&self) -> Arc<[u8]> {
        match &self.0 {
            Repr::Inline { .. } => Arc::from(self.as_slice()),
            Repr::Shared(a) => Arc::clone(a),
        }
    }

    /// Inline form of `v`, if it is short enough.
    #[inline]
    fn inline(v: &[u8]) -> Option<Self> {
        let len = u8::try_from(v.len())
            .ok()
            .filter(|&l| usize::from(l) <= INLINE_CAP)?;
        let mut data = [0u8; INLINE_CAP];
        data[..v.len()].copy_from_slice(v);
        Some(Bytes(Repr::Inline { len, data }))
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for Bytes {
    #[inline]
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::borrow::Borrow<[u8]> for Bytes {
    #[inline]
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

// Equality, order and hash are the content's, identical to `[u8]`'s (required by the
// `Borrow<[u8]>` impl: ordered maps of `Bytes` are searched and ranged by `&[u8]`).
impl PartialEq for Bytes {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Bytes {}

impl PartialOrd for Bytes {
    #[inline]
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bytes {
    #[inline]
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

impl Hash for Bytes {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl From<&[u8]> for Bytes {
    #[inline]
    fn from(v: &[u8]) -> Self {
        Bytes::inline(v).unwrap_or_else(|| Bytes(Repr::Shared(Arc::from(v))))
    }
}

impl From<Vec<u8>> for Bytes {
    #[inline]
    fn from(v: Vec<u8>) -> Self {
        Bytes::inline(&v).unwrap_or_else(|| Bytes(Repr::Shared(Arc::from(v))))
    }
}

impl fmt::Debug for Bytes {
    // Length only: keys and values may be secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes(len={})", self.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.as_slice())
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(BytesVisitor(PhantomData))
    }
}

/// A value: one shared allocation whatever its length, so handing it out through the
/// public API (`to_arc`) is a reference-count increment, never a copy, and the slot
/// holding it (also as `Option`) stays two words wide. Same serde form as [`Bytes`].
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SharedBytes(Arc<[u8]>);

const _: () = assert!(std::mem::size_of::<Option<SharedBytes>>() == 16);

impl SharedBytes {
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    /// The content as the public API's `Arc<[u8]>` (a reference-count increment).
    #[inline]
    pub fn to_arc(&self) -> Arc<[u8]> {
        Arc::clone(&self.0)
    }
}

impl std::ops::Deref for SharedBytes {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for SharedBytes {
    #[inline]
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::borrow::Borrow<[u8]> for SharedBytes {
    #[inline]
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl From<&[u8]> for SharedBytes {
    #[inline]
    fn from(v: &[u8]) -> Self {
        SharedBytes(Arc::from(v))
    }
}

impl From<Vec<u8>> for SharedBytes {
    #[inline]
    fn from(v: Vec<u8>) -> Self {
        SharedBytes(Arc::from(v))
    }
}

impl fmt::Debug for SharedBytes {
    // Length only: values may be secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedBytes(len={})", self.0.len())
    }
}

impl Serialize for SharedBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for SharedBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(BytesVisitor(PhantomData))
    }
}

/// Builds a [`Bytes`] or [`SharedBytes`] straight from the deserializer's buffer (no
/// intermediate `Vec` for a borrowed blob).
struct BytesVisitor<T>(PhantomData<T>);

impl<'de, T> Visitor<'de> for BytesVisitor<T>
where
    T: for<'a> From<&'a [u8]> + From<Vec<u8>>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<T, E> {
        Ok(T::from(v))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<T, E> {
        Ok(T::from(v))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        VecVisitor.visit_seq(seq).map(T::from)
    }
}

struct VecVisitor;

impl<'de> Visitor<'de> for VecVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element()? {
            out.push(b);
        }
        Ok(out)
    }
}

pub(crate) fn deserialize_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    d.deserialize_bytes(VecVisitor)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::collections::hash_map::DefaultHasher;
    use std::ops::Bound;

    use super::*;

    fn hash_of<T: Hash + ?Sized>(v: &T) -> u64 {
        let mut h = DefaultHasher::new();
        v.hash(&mut h);
        h.finish()
    }

    /// Contents around the inline/shared boundary, with shared prefixes, so that
    /// comparisons cross representations.
    fn samples() -> Vec<Vec<u8>> {
        let mut out = vec![Vec::new(), vec![0], vec![0, 0], vec![255], vec![1, 2, 3]];
        for len in [1, 7, 8, 15, 16, 17, 21, 22, 23, 24, 31, 32, 100] {
            out.push(vec![7; len]);
            let mut v = vec![7; len];
            *v.last_mut().expect("len > 0") = 8;
            out.push(v);
            out.push((0..len).map(|i| i as u8).collect());
        }
        out
    }

    #[test]
    fn forms() {
        assert!(matches!(Bytes::from(&[1u8; 22][..]).0, Repr::Inline { .. }));
        assert!(matches!(Bytes::from(vec![1u8; 22]).0, Repr::Inline { .. }));
        assert!(matches!(Bytes::from(&[1u8; 23][..]).0, Repr::Shared(_)));
        assert!(matches!(Bytes::from(vec![1u8; 23]).0, Repr::Shared(_)));
        assert!(matches!(Bytes::from(&[1u8; 100][..]).0, Repr::Shared(_)));
    }

    #[test]
    fn content_semantics_match_slices() {
        let s = samples();
        for a in &s {
            let ba = Bytes::from(a.as_slice());
            // The shared form of a short content (never built outside tests) still
            // compares, orders and hashes by content.
            let shared = Bytes(Repr::Shared(Arc::from(a.as_slice())));
            assert_eq!(&*ba, a.as_slice());
            assert_eq!(&*ba.to_arc(), a.as_slice());
            assert_eq!(ba, shared);
            assert_eq!(hash_of(&ba), hash_of(a.as_slice()));
            assert_eq!(hash_of(&shared), hash_of(a.as_slice()));
            assert_eq!(ba.clone(), ba);
            for b in &s {
                let bb = Bytes::from(b.clone());
                let want = a.as_slice().cmp(b.as_slice());
                assert_eq!(ba.cmp(&bb), want);
                assert_eq!(shared.cmp(&bb), want);
                assert_eq!(ba.partial_cmp(&bb), Some(want));
                assert_eq!(ba == bb, a == b);
            }
        }
    }

    #[test]
    fn ordered_map_lookup_and_range_by_slice() {
        let s = samples();
        let map: imbl::OrdMap<Bytes, usize> = s
            .iter()
            .enumerate()
            .map(|(i, k)| (Bytes::from(k.as_slice()), i))
            .collect();
        let reference: BTreeMap<Vec<u8>, usize> =
            s.iter().enumerate().map(|(i, k)| (k.clone(), i)).collect();
        for k in &s {
            assert_eq!(map.get(k.as_slice()), reference.get(k));
        }
        for lo in &s {
            let got: Vec<&[u8]> = map
                .range::<_, [u8]>((Bound::Included(lo.as_slice()), Bound::Unbounded))
                .map(|(k, _)| &**k)
                .collect();
            let want: Vec<&[u8]> = reference
                .range::<[u8], _>((Bound::Included(lo.as_slice()), Bound::Unbounded))
                .map(|(k, _)| k.as_slice())
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn serde_round_trip_and_debug() {
        for v in samples() {
            let b = Bytes::from(v.clone());
            let enc = postcard::to_allocvec(&b).expect("encode");
            assert_eq!(
                enc,
                postcard::to_allocvec(&serde_bytes_like(&v)).expect("encode")
            );
            let back: Bytes = postcard::from_bytes(&enc).expect("decode");
            assert_eq!(back, b);
            let shared = SharedBytes::from(v.as_slice());
            assert_eq!(postcard::to_allocvec(&shared).expect("encode"), enc);
            let back: SharedBytes = postcard::from_bytes(&enc).expect("decode");
            assert_eq!(&*back, v.as_slice());
            assert!(Arc::ptr_eq(&back.to_arc(), &back.0));
            let json = serde_json::to_string(&b).expect("json");
            let back: Bytes = serde_json::from_str(&json).expect("json decode");
            assert_eq!(back, b);
            assert_eq!(format!("{b:?}"), format!("Bytes(len={})", v.len()));
            assert_eq!(
                format!("{shared:?}"),
                format!("SharedBytes(len={})", v.len())
            );
        }
    }

    /// What the previous `Arc<[u8]>`-backed `Bytes` wrote: `serialize_bytes`.
    struct SerBytes<'a>(&'a [u8]);
    impl Serialize for SerBytes<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }
    fn serde_bytes_like(v: &[u8]) -> SerBytes<'_> {
        SerBytes(v)
    }
}

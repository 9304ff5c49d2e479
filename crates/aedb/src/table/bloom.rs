//! The bloom filter of a table's user keys, stored in its bloom block.
//!
//! Written by hand (it is small) because it is part of the on-disk format: the hash
//! must be a fixed, specified function, which bloom crates do not promise for their
//! serialized form.
//!
//! Cache-line blocked (as RocksDB's): all probes of a key fall in one 64-byte line,
//! so a lookup costs one memory miss instead of k, for a slightly higher
//! false-positive rate (about 1.2 % at 10 bits per key instead of 0.8 %). Key hash
//! h1 = XXH3-64(key, seed 0) picks line h1 mod lines; h2 = the splitmix64 finalizer
//! of h1 gives a = its low 32 bits, b = its high 32 bits with the low bit set, and
//! probe i sets bit (a + i * b) mod 512 of the line (double hashing in 32 bits).
//! Block: probes k (u8) | bit count m (u64, a multiple of 512) | m / 8 bytes, bit j
//! at byte j / 8, bit j % 8.

use xxhash_rust::xxh3::xxh3_64;

/// At 10 bits per key, 7 probes in one line give about 1.2 % false positives.
pub(crate) const DEFAULT_BITS_PER_KEY: u32 = 10;
const MAX_PROBES: u8 = 30;
/// One cache line.
const LINE_BITS: u64 = 512;

pub(crate) fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// The bits key hash `h1` probes in a filter of `lines` lines, as absolute bit
/// numbers.
fn probes(h1: u64, lines: u64, k: u8) -> impl Iterator<Item = u64> {
    let mut z = h1.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let h2 = z ^ (z >> 31);
    let (a, b) = (h2 as u32, (h2 >> 32) as u32 | 1);
    let line = (h1 % lines) * LINE_BITS;
    (0..u32::from(k)).map(move |i| line + u64::from(a.wrapping_add(i.wrapping_mul(b))) % LINE_BITS)
}

/// The hashes of a table's distinct user keys until the table is finished (the
/// filter's size depends on their count). Bounded by the writer's entry limit.
#[derive(Debug)]
pub(crate) struct BloomBuilder {
    hashes: Vec<u64>,
    bits_per_key: u32,
}

impl BloomBuilder {
    pub(crate) fn new(bits_per_key: u32) -> Self {
        assert!((1..=64).contains(&bits_per_key), "bits per key in 1..=64");
        Self {
            hashes: Vec::new(),
            bits_per_key,
        }
    }

    /// Adds one distinct user key (callers add each key once).
    pub(crate) fn add(&mut self, key: &[u8]) {
        self.hashes.push(key_hash(key));
    }

    pub(crate) fn finish(&self) -> Vec<u8> {
        let n = self.hashes.len() as u64;
        let lines = (n * u64::from(self.bits_per_key))
            .div_ceil(LINE_BITS)
            .max(1);
        let bits = lines * LINE_BITS;
        // ln 2 * bits per key probes minimise false positives.
        let k = ((f64::from(self.bits_per_key) * std::f64::consts::LN_2).round() as u8)
            .clamp(1, MAX_PROBES);
        let mut out = vec![0u8; 9 + bits.div_ceil(8) as usize];
        out[0] = k;
        out[1..9].copy_from_slice(&bits.to_le_bytes());
        let filter = &mut out[9..];
        for &h1 in &self.hashes {
            for bit in probes(h1, lines, k) {
                filter[(bit / 8) as usize] |= 1 << (bit % 8);
            }
        }
        out
    }
}

/// A decoded bloom block.
#[derive(Debug)]
pub(crate) struct BloomFilter {
    probes: u8,
    lines: u64,
    filter: Vec<u8>,
}

impl BloomFilter {
    pub(crate) fn decode(mut b: Vec<u8>) -> Result<Self, String> {
        if b.len() < 9 {
            return Err("shorter than its header".into());
        }
        let probes = b[0];
        let mut m = [0u8; 8];
        m.copy_from_slice(&b[1..9]);
        let bits = u64::from_le_bytes(m);
        if probes == 0 || probes > MAX_PROBES {
            return Err(format!("{probes} probes"));
        }
        if bits < LINE_BITS || bits % LINE_BITS != 0 || bits / 8 != (b.len() - 9) as u64 {
            return Err(format!("{bits} bits in {} bytes", b.len() - 9));
        }
        b.drain(..9);
        Ok(Self {
            probes,
            lines: bits / LINE_BITS,
            filter: b,
        })
    }

    /// False only when `key` is certainly not in the table.
    pub(crate) fn may_contain(&self, key: &[u8]) -> bool {
        self.may_contain_hash(key_hash(key))
    }

    pub(crate) fn may_contain_hash(&self, h1: u64) -> bool {
        probes(h1, self.lines, self.probes)
            .all(|bit| self.filter[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.filter.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_about_one_percent_false_positives() {
        let mut b = BloomBuilder::new(DEFAULT_BITS_PER_KEY);
        for i in 0..10_000u32 {
            b.add(format!("key-{i}").as_bytes());
        }
        let f = BloomFilter::decode(b.finish()).expect("decodes its own encoding");
        for i in 0..10_000u32 {
            assert!(f.may_contain(format!("key-{i}").as_bytes()));
        }
        let fp = (0..10_000u32)
            .filter(|i| f.may_contain(format!("other-{i}").as_bytes()))
            .count();
        // 120 of 10,000 (~1.2 %); the keys are fixed, so the count is too.
        assert!(fp < 200, "{fp} false positives in 10,000");
    }

    #[test]
    fn decode_refuses_inconsistent_sizes() {
        let mut bytes = BloomBuilder::new(10).finish();
        bytes.push(0);
        assert!(BloomFilter::decode(bytes).is_err());
        assert!(BloomFilter::decode(vec![0; 3]).is_err());
    }
}

//! A bounded window of recent samples (latencies in seconds) and their
//! percentiles, for endpoints that report p50/p95 a Prometheus scrape cannot
//! give (`encryption/stats`, `rbac/cache/stats`'s Redis round trip).

/// The newest `capacity` samples; older ones are overwritten.
#[derive(Debug)]
pub struct SampleWindow {
    buf: Vec<f64>,
    next: usize,
    capacity: usize,
}

impl SampleWindow {
    pub fn with_capacity(capacity: usize) -> Self {
        assert!(capacity > 0, "a sample window holds at least one sample");
        Self {
            buf: Vec::new(),
            next: 0,
            capacity,
        }
    }

    pub fn push(&mut self, v: f64) {
        if self.buf.len() < self.capacity {
            self.buf.push(v);
        } else {
            self.buf[self.next] = v;
        }
        self.next = (self.next + 1) % self.capacity;
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The nearest-rank percentile `p` (0..=1) of the window; 0 when empty.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.buf.is_empty() {
            return 0.0;
        }
        let mut v = self.buf.clone();
        v.sort_by(f64::total_cmp);
        let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_samples_and_ranks_them() {
        let mut w = SampleWindow::with_capacity(4);
        assert_eq!(w.percentile(0.5), 0.0);
        for v in [9.0, 1.0, 2.0, 3.0, 4.0] {
            w.push(v);
        }
        // 9.0 was overwritten by 4.0.
        assert_eq!(w.len(), 4);
        assert_eq!(w.percentile(0.5), 2.0);
        assert_eq!(w.percentile(0.95), 4.0);
        assert_eq!(w.percentile(0.0), 1.0);
    }
}

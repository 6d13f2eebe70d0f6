//! A small seeded pseudo-random generator for the simulators (SplitMix64): the same seed gives
//! the same city and the same sequence of choices. Not for anything secret.

/// SplitMix64 (Steele, Lea and Flood, 2014): tiny, fast, and good enough to scatter patients
/// over a map and roll dice for simulated people.
#[derive(Clone, Debug)]
pub struct SimRng {
    state: u64,
}

impl SimRng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator seeded from the operating system.
    pub fn from_entropy() -> Self {
        let mut bytes = [0u8; 8];
        // An unavailable entropy source only makes the run less varied, never wrong.
        let _ = getrandom::fill(&mut bytes);
        Self::new(u64::from_le_bytes(bytes))
    }

    /// An independent generator derived from this one (for a task of its own).
    pub fn fork(&mut self) -> Self {
        Self::new(self.next_u64())
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform index in `0..n` (`0` when `n` is 0).
    pub fn index(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        // Multiply-shift: unbiased enough for simulation purposes.
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// One element of a non-empty slice (`None` when empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        items.get(self.index(items.len()))
    }

    /// Roughly normal with mean 0 and standard deviation 1 (sum of uniforms; bounded to ±6,
    /// which suits vital-sign noise better than an unbounded tail).
    pub fn noise(&mut self) -> f64 {
        (0..12).map(|_| self.unit()).sum::<f64>() - 6.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_ranges_hold() {
        let (mut a, mut b) = (SimRng::new(7), SimRng::new(7));
        for _ in 0..1_000 {
            assert_eq!(a.next_u64(), b.next_u64());
            let u = a.unit();
            assert!((0.0..1.0).contains(&u));
            assert!(a.index(5) < 5);
            assert!((-6.0..=6.0).contains(&a.noise()));
            b.unit();
            b.index(5);
            b.noise();
        }
        assert_eq!(a.index(0), 0);
        assert!(a.pick::<u8>(&[]).is_none());
    }
}

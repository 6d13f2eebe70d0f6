//! Simulated time: the demo's people think in simulated seconds (a crew spends four minutes on
//! scene); [`Clock`] turns those into wall-clock waits by dividing by the time scale.

use std::time::Duration;

/// Converts simulated durations into wall-clock ones.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    scale: f64,
}

impl Clock {
    /// A clock running `scale` times faster than real time (`scale` must be positive).
    pub fn new(scale: f64) -> anyhow::Result<Self> {
        anyhow::ensure!(
            scale.is_finite() && scale > 0.0,
            "the time scale must be a positive number, got {scale}"
        );
        Ok(Self { scale })
    }

    /// The speed-up factor.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// How long `sim_s` simulated seconds last on the wall clock.
    pub fn wall(&self, sim_s: f64) -> Duration {
        Duration::try_from_secs_f64(sim_s.max(0.0) / self.scale).unwrap_or(Duration::MAX)
    }

    /// How many simulated seconds `wall` of wall-clock time stands for.
    pub fn sim_s(&self, wall: Duration) -> f64 {
        wall.as_secs_f64() * self.scale
    }

    /// `wall(sim_s)`, but never shorter than `floor`: for periodic work whose real-world rate
    /// must stay bounded however fast the simulation runs.
    pub fn wall_at_least(&self, sim_s: f64, floor: Duration) -> Duration {
        self.wall(sim_s).max(floor)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn scales_both_ways_and_refuses_nonsense() {
        let c = Clock::new(20.0).unwrap();
        assert_eq!(c.wall(60.0), Duration::from_secs(3));
        assert!((c.sim_s(Duration::from_secs(3)) - 60.0).abs() < 1e-9);
        assert_eq!(
            c.wall_at_least(1.0, Duration::from_millis(250)),
            Duration::from_millis(250)
        );
        assert_eq!(c.wall(-5.0), Duration::ZERO);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Clock::new(bad).is_err());
        }
    }
}

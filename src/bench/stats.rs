//! Summary statistics of a case's samples.
//!
//! Method, fixed so that figures from different runs compare:
//! - **median**: the middle sample of the sorted samples; for an even count, the mean of
//!   the two middle ones;
//! - **p95**: the *nearest-rank* 95th percentile, the sample of rank `ceil(0.95 * n)`
//!   (1-based) in sorted order: always an observed value, never interpolated, and equal
//!   to the maximum for fewer than 20 samples;
//! - **ratio**: this case's median divided by its baseline case's median.

use serde::Serialize;

/// min / median / p95 / max of some samples, in the samples' unit.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub count: usize,
    pub min: f64,
    pub median: f64,
    pub p95: f64,
    pub max: f64,
}

impl Summary {
    /// The summary of `samples`; None when there are none (or any is NaN).
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Summary {
            count: sorted.len(),
            min: sorted[0],
            median: median_of_sorted(&sorted),
            p95: nearest_rank(&sorted, 95),
            max: sorted[sorted.len() - 1],
        })
    }
}

fn median_of_sorted(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// The nearest-rank `percent`th percentile of non-empty sorted samples: the sample of
/// 1-based rank `ceil(percent / 100 * n)`, computed in integers to avoid rounding error.
fn nearest_rank(sorted: &[f64], percent: usize) -> f64 {
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// `value / baseline`, when both are there and the baseline is positive.
pub fn ratio(value: f64, baseline: f64) -> Option<f64> {
    (baseline > 0.0).then(|| value / baseline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_has_no_summary() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn one_sample() {
        let s = Summary::of(&[7.0]).unwrap();
        assert_eq!((s.min, s.median, s.p95, s.max), (7.0, 7.0, 7.0, 7.0));
    }

    #[test]
    fn odd_count_median_is_the_middle() {
        let s = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!(s.median, 3.0);
        assert_eq!((s.min, s.max, s.count), (1.0, 5.0, 3));
    }

    #[test]
    fn even_count_median_is_the_mean_of_the_middle_two() {
        let s = Summary::of(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(s.median, 3.0);
    }

    #[test]
    fn p95_is_nearest_rank() {
        // 1..=100: rank ceil(95) = 95.
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(Summary::of(&hundred).unwrap().p95, 95.0);
        // 1..=20: rank ceil(19) = 19.
        let twenty: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(Summary::of(&twenty).unwrap().p95, 19.0);
        // 1..=21: rank ceil(19.95) = 20.
        let twenty_one: Vec<f64> = (1..=21).map(f64::from).collect();
        assert_eq!(Summary::of(&twenty_one).unwrap().p95, 20.0);
        // Fewer than 20 samples: the maximum.
        assert_eq!(Summary::of(&[3.0, 9.0, 1.0]).unwrap().p95, 9.0);
    }

    #[test]
    fn ratio_needs_a_positive_baseline() {
        assert_eq!(ratio(10.0, 4.0), Some(2.5));
        assert_eq!(ratio(10.0, 0.0), None);
    }
}

//! Percentiles (nearest rank) over samples in microseconds.

use serde_json::{Value, json};

#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

pub fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = |q: f64| {
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    };
    Some(Summary {
        n: v.len(),
        p50: rank(0.50),
        p90: rank(0.90),
        p99: rank(0.99),
        max: v[v.len() - 1],
        mean: v.iter().sum::<f64>() / v.len() as f64,
    })
}

/// `{"p50": .., "p90": .., "p99": .., "max": .., "mean": ..}` or null.
pub fn to_json(s: Option<Summary>) -> Value {
    match s {
        Some(s) => json!({
            "n": s.n,
            "p50": round1(s.p50),
            "p90": round1(s.p90),
            "p99": round1(s.p99),
            "max": round1(s.max),
            "mean": round1(s.mean),
        }),
        None => Value::Null,
    }
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub fn fmt(s: Option<Summary>) -> String {
    match s {
        Some(s) => format!(
            "p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs (n={})",
            s.p50, s.p99, s.max, s.n
        ),
        None => "no samples".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = summarize(&v).unwrap();
        assert_eq!(s.p50, 50.0);
        assert_eq!(s.p99, 99.0);
        assert_eq!(s.max, 100.0);
        let one = summarize(&[7.0]).unwrap();
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
    }
}

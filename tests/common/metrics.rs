//! Prometheus text format (`name{label="value",...} value`): one parser for every test
//! that reads `/metrics`.
//!
//! - [`metric_value`] / [`metric`]: one lookup in a scrape's text, by name and a subset of
//!   the labels (the first matching sample wins). Lenient: malformed lines are skipped.
//! - [`parse_metrics`] and [`Scrape`]: every sample of a scrape, with lookups by the exact
//!   label set, for tests that check many series at once. Strict: a malformed line panics.

use std::collections::BTreeMap;

use super::Proxy;

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses one line: `Ok(None)` for a comment or a blank line, `Err` (saying what is wrong)
/// for a line that is not a sample.
fn parse_line(line: &str) -> Result<Option<Sample>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, after) = parse_label_set(&line[open + 1..])
                .ok_or_else(|| format!("malformed labels in {line:?}"))?;
            (&line[..open], labels, after)
        }
        None => {
            let end = line.find(char::is_whitespace).unwrap_or(line.len());
            (&line[..end], BTreeMap::new(), &line[end..])
        }
    };
    let value = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| format!("no value in {line:?}"))?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .map_err(|e| format!("bad value {v:?} in {line:?}: {e}"))?,
    };
    Ok(Some(Sample {
        name: name.to_string(),
        labels,
        value,
    }))
}

/// Parses `k="v",k2="v2"}` (the text after `{`); returns the labels and the text after `}`.
/// Values may hold escapes (`\"`, `\\`, `\n`), commas and braces.
fn parse_label_set(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        let mut chars = s[eq + 1..].strip_prefix('"')?.char_indices();
        let body = &s[eq + 2..];
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key, value);
        s = &body[end + 1..];
    }
}

/// Every sample of a Prometheus text exposition (comments and blank lines skipped); panics
/// on a line that is not a sample.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter_map(|line| parse_line(line).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// The value of the first sample of metric `name` whose labels include all of `labels`,
/// in Prometheus text format. Lines that are not samples are skipped.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter_map(|line| parse_line(line).ok().flatten())
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|pv| pv == v))
        })
        .map(|s| s.value)
}

/// Like [`metric_value`], panicking (with the whole scrape) when there is no such sample.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(text, name, labels)
        .unwrap_or_else(|| panic!("no sample of {name} {labels:?} in /metrics:\n{text}"))
}

/// A parsed scrape of `/metrics`, with lookups by exact label set.
pub struct Scrape {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Scrape {
    /// `GET /metrics` on `proxy`'s admin listener, parsed.
    pub async fn take(proxy: &Proxy) -> Scrape {
        let text = proxy.metrics_text().await;
        Scrape {
            samples: parse_metrics(&text),
            text,
        }
    }

    /// The value of the series `name` whose labels are exactly `labels`; panics if the
    /// series appears more than once.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == want)
            .collect();
        assert!(
            found.len() <= 1,
            "series {name}{labels:?} appears {} times",
            found.len()
        );
        found.first().map(|s| s.value)
    }

    /// Like [`Scrape::get`], panicking (with the whole scrape) when the series is missing.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            panic!(
                "series {name}{labels:?} is missing from /metrics:\n{}",
                self.text
            )
        })
    }

    /// Asserts that the series `name` with exactly `labels` is `want`.
    pub fn expect(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let got = self.value(name, labels);
        assert_eq!(got, want, "{name}{labels:?}");
    }
}

//! How numbers are written in the report, as template filters: `{{ rate | n }}`, `{{ ns | sig }}`,
//! `{{ share | pct(1) }}`. The templates hold the prose; these hold the number formats, so a
//! figure looks the same wherever it appears.

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};

pub fn register(env: &mut Environment<'_>) {
    env.add_filter("n", |x: f64| grouped(x, 0));
    env.add_filter("fixed", |x: f64, decimals: usize| grouped(x, decimals));
    env.add_filter("sig", sig);
    env.add_filter("pct", |x: f64, decimals: usize| pct(x, decimals, false));
    env.add_filter("signed_pct", |x: f64, decimals: usize| {
        pct(x, decimals, true)
    });
    env.add_filter("mark", mark);
    env.add_filter("ci", ci);
}

/// `x` with `decimals` decimals and thousands separators: 1234567.8 → "1,234,568" at 0.
pub fn grouped(x: f64, decimals: usize) -> String {
    let text = format!("{:.*}", decimals, x.abs());
    let (int, frac) = text
        .split_once('.')
        .map_or((text.as_str(), None), |(i, f)| (i, Some(f)));
    let mut out = String::with_capacity(text.len() + int.len() / 3 + 1);
    if x.is_sign_negative() && text.bytes().any(|b| b.is_ascii_digit() && b != b'0') {
        out.push('-');
    }
    for (i, digit) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    if let Some(frac) = frac {
        out.push('.');
        out.push_str(frac);
    }
    out
}

/// A small quantity with three significant digits: 0.25612 → "0.256", 356.2 → "356".
pub fn sig(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let magnitude = x.abs().log10().floor() as i32;
    grouped(x, (2 - magnitude).max(0) as usize)
}

/// A share as a percentage: 0.862 → "86.2%" at one decimal; signed, "+5.7%".
pub fn pct(x: f64, decimals: usize, signed: bool) -> String {
    if signed {
        format!("{:+.*}%", decimals, x * 100.0)
    } else {
        format!("{:.*}%", decimals, x * 100.0)
    }
}

/// Whether a target is met.
pub fn mark(met: bool) -> &'static str {
    if met { "✅ met" } else { "❌ not met" }
}

/// A measurement's 95% confidence interval in elements per second, "⚠" when it is noisy.
fn ci(measure: &Value) -> Result<String, Error> {
    let field = |name: &str| -> Result<Value, Error> {
        let value = measure.get_attr(name)?;
        if value.is_undefined() {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("ci: no `{name}` in {measure}"),
            ));
        }
        Ok(value)
    };
    let number = |name: &str| -> Result<f64, Error> { f64::try_from(field(name)?) };
    let noisy = field("noisy")?.is_true();
    Ok(format!(
        "{} – {}{}",
        grouped(number("rate_low")?, 0),
        grouped(number("rate_high")?, 0),
        if noisy { " ⚠" } else { "" }
    ))
}

/// A duration as "5 min 32 s", or "32 s" under a minute.
pub fn duration(seconds: f64) -> String {
    let total = seconds.round().max(0.0) as u64;
    match (total / 60, total % 60) {
        (0, secs) => format!("{secs} s"),
        (minutes, secs) => format!("{minutes} min {secs} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_separates_thousands_and_rounds() {
        assert_eq!(grouped(2_812_686.7, 0), "2,812,687");
        assert_eq!(grouped(999.4, 0), "999");
        assert_eq!(grouped(147.63, 1), "147.6");
        assert_eq!(grouped(1234.5678, 2), "1,234.57");
        assert_eq!(grouped(-1234.0, 0), "-1,234");
        assert_eq!(grouped(0.0, 0), "0");
    }

    #[test]
    fn sig_keeps_three_significant_digits() {
        assert_eq!(sig(355.93), "356");
        assert_eq!(sig(32.77), "32.8");
        assert_eq!(sig(8.8812), "8.88");
        assert_eq!(sig(0.25612), "0.256");
        assert_eq!(sig(3899.2), "3,899");
        assert_eq!(sig(0.0), "0");
    }

    #[test]
    fn percentages() {
        assert_eq!(pct(0.8624, 1, false), "86.2%");
        assert_eq!(pct(0.7, 0, false), "70%");
        assert_eq!(pct(0.0574, 1, true), "+5.7%");
        assert_eq!(pct(-0.032, 1, true), "-3.2%");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(332.4), "5 min 32 s");
        assert_eq!(duration(59.6), "1 min 0 s");
        assert_eq!(duration(12.0), "12 s");
    }

    #[test]
    fn ci_filter_flags_noisy_intervals() {
        let mut env = Environment::new();
        register(&mut env);
        let render = |noisy: bool| {
            env.render_str(
                "{{ m | ci }}",
                minijinja::context! { m => minijinja::context! { rate_low => 82558.2, rate_high => 103677.0, noisy } },
            )
            .unwrap()
        };
        assert_eq!(render(false), "82,558 – 103,677");
        assert_eq!(render(true), "82,558 – 103,677 ⚠");
        assert!(env.render_str("{{ 1 | ci }}", ()).is_err());
    }

    #[test]
    fn marks() {
        assert_eq!(mark(true), "✅ met");
        assert_eq!(mark(false), "❌ not met");
    }
}

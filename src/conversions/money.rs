//! Money without floating point: amounts are parsed from the request's decimal text into
//! integer minor units of their currency (cents, yen, fils) and summed as integers in Redis
//! (`HINCRBY`), so a million conversions of 59.90 add up to exactly 59,900,000.00.
//!
//! Currencies are ISO 4217 alphabetic codes (three letters, upper case). The minor unit is
//! the code's exponent: 2 for most, 0 for the yen and the others listed in [`ZERO`], 3 for
//! the dinars of [`THREE`], 4 for the Chilean and Uruguayan units of account of [`FOUR`].

/// ISO 4217 codes whose minor unit is 0 (no subdivision in use).
pub const ZERO: &[&str] = &[
    "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
    "VUV", "XAF", "XOF", "XPF",
];
/// ISO 4217 codes whose minor unit is 3.
pub const THREE: &[&str] = &["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];
/// ISO 4217 codes whose minor unit is 4.
pub const FOUR: &[&str] = &["CLF", "UYW"];

/// The largest amount accepted, in minor units (10^15: a trillion euros in cents), so that
/// sums of many stay far inside an i64.
pub const MAX_MINOR: i64 = 1_000_000_000_000_000;

/// An ISO 4217 alphabetic code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Currency([u8; 3]);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("currency {0:?} is not an ISO 4217 code (three letters, such as EUR)")]
    Currency(String),
    #[error("value {0:?} is not a plain decimal number (such as 59.90)")]
    Malformed(String),
    #[error("value {0} is negative; values are 0 or more")]
    Negative(String),
    #[error("value {value} has more decimals than {currency} has ({exponent})")]
    Precision {
        value: String,
        currency: String,
        exponent: u32,
    },
    #[error("value {0} is too large")]
    TooLarge(String),
}

impl Currency {
    /// Three ASCII letters, in either case (kept in upper case).
    pub fn parse(s: &str) -> Result<Currency, MoneyError> {
        match s.as_bytes() {
            [a, b, c] if [a, b, c].iter().all(|x| x.is_ascii_alphabetic()) => Ok(Currency([
                a.to_ascii_uppercase(),
                b.to_ascii_uppercase(),
                c.to_ascii_uppercase(),
            ])),
            _ => Err(MoneyError::Currency(s.chars().take(16).collect())),
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("ASCII letters")
    }

    /// Decimal places of the minor unit.
    pub fn exponent(&self) -> u32 {
        let c = self.as_str();
        if ZERO.contains(&c) {
            0
        } else if THREE.contains(&c) {
            3
        } else if FOUR.contains(&c) {
            4
        } else {
            2
        }
    }

    /// `minor` minor units as a number of major units: the nearest double to the exact
    /// decimal, which prints as that decimal (59.9 for 5990 cents).
    pub fn major(&self, minor: i64) -> f64 {
        minor as f64 / 10f64.powi(self.exponent() as i32)
    }

    /// `minor` minor units as exact decimal text (`59.90`).
    pub fn decimal(&self, minor: i64) -> String {
        let e = self.exponent() as usize;
        let sign = if minor < 0 { "-" } else { "" };
        let digits = minor.unsigned_abs().to_string();
        if e == 0 {
            return format!("{sign}{digits}");
        }
        let digits = format!("{digits:0>width$}", width = e + 1);
        let (int, frac) = digits.split_at(digits.len() - e);
        format!("{sign}{int}.{frac}")
    }

    /// An amount's text (a JSON number or string: `59.90`, `60`, `"1200"`) in minor units,
    /// exactly: more decimals than the currency has are refused, never rounded.
    pub fn parse_amount(&self, text: &str) -> Result<i64, MoneyError> {
        let t = text.trim();
        let t = t
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(t)
            .trim();
        let malformed = || MoneyError::Malformed(text.chars().take(32).collect());
        if let Some(rest) = t.strip_prefix('-') {
            if rest.bytes().any(|b| b.is_ascii_digit() && b != b'0') {
                return Err(MoneyError::Negative(text.chars().take(32).collect()));
            }
        }
        let t = t.strip_prefix('-').unwrap_or(t);
        let (int, frac) = t.split_once('.').unwrap_or((t, ""));
        if int.is_empty()
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
            || (t.contains('.') && frac.is_empty())
        {
            return Err(malformed());
        }
        let exponent = self.exponent();
        let frac = frac.trim_end_matches('0');
        if frac.len() > exponent as usize {
            return Err(MoneyError::Precision {
                value: t.to_string(),
                currency: self.as_str().to_string(),
                exponent,
            });
        }
        let int = int.trim_start_matches('0');
        let too_large = || MoneyError::TooLarge(t.chars().take(32).collect());
        if int.len() > 18 {
            return Err(too_large());
        }
        let mut minor: i64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| malformed())?
        };
        minor = minor
            .checked_mul(10i64.pow(exponent))
            .ok_or_else(too_large)?;
        if !frac.is_empty() {
            let f: i64 = frac.parse().map_err(|_| malformed())?;
            minor += f * 10i64.pow(exponent - frac.len() as u32);
        }
        if minor > MAX_MINOR {
            return Err(too_large());
        }
        Ok(minor)
    }
}

impl std::fmt::Display for Currency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An amount in major units as the currency writes it (`100.00 EUR`, `1000 JPY`).
pub fn format_major(currency: &str, major: f64) -> String {
    match Currency::parse(currency) {
        Ok(c) => {
            let minor = (major * 10f64.powi(c.exponent() as i32)).round() as i64;
            format!("{} {c}", c.decimal(minor))
        }
        Err(_) => format!("{major} {currency}"),
    }
}

/// `(revenue − cost) / cost`, both in minor units of one currency; None without a cost.
pub fn roi(revenue: i64, cost: i64) -> Option<f64> {
    (cost > 0).then(|| (revenue - cost) as f64 / cost as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur() -> Currency {
        Currency::parse("EUR").unwrap()
    }

    #[test]
    fn currency_codes_are_three_letters_with_their_minor_unit() {
        assert_eq!(Currency::parse("eur").unwrap().as_str(), "EUR");
        for bad in ["", "EU", "EURO", "E1R", "€", "€UR", "US$"] {
            assert!(Currency::parse(bad).is_err(), "{bad:?}");
        }
        let e = |c: &str| Currency::parse(c).unwrap().exponent();
        assert_eq!((e("EUR"), e("USD"), e("JPY"), e("KRW")), (2, 2, 0, 0));
        assert_eq!((e("BHD"), e("KWD"), e("TND"), e("CLF")), (3, 3, 3, 4));
    }

    #[test]
    fn amounts_are_parsed_exactly_into_minor_units() {
        let p = |c: &str, t: &str| Currency::parse(c).unwrap().parse_amount(t);
        assert_eq!(p("EUR", "59.90"), Ok(5990));
        assert_eq!(p("EUR", "59.9"), Ok(5990));
        assert_eq!(p("EUR", "\"1200\""), Ok(120_000));
        assert_eq!(p("EUR", "0"), Ok(0));
        assert_eq!(p("EUR", "-0.00"), Ok(0));
        assert_eq!(p("EUR", "0.10"), Ok(10));
        assert_eq!(p("EUR", "007.5"), Ok(750));
        assert_eq!(p("JPY", "1200"), Ok(1200));
        assert_eq!(p("JPY", "1200.00"), Ok(1200));
        assert_eq!(p("BHD", "1.234"), Ok(1234));
        assert!(matches!(p("JPY", "1.5"), Err(MoneyError::Precision { .. })));
        assert!(matches!(
            p("EUR", "0.001"),
            Err(MoneyError::Precision { .. })
        ));
        assert!(matches!(p("EUR", "-1"), Err(MoneyError::Negative(_))));
        for bad in [
            "", ".5", "5.", "1e3", "NaN", "inf", "1,5", "0x10", "+1", "\"\"", "1 2",
        ] {
            assert!(
                matches!(p("EUR", bad), Err(MoneyError::Malformed(_))),
                "{bad:?}: {:?}",
                p("EUR", bad)
            );
        }
        assert!(matches!(
            p("EUR", "99999999999999999999"),
            Err(MoneyError::TooLarge(_))
        ));
        assert!(matches!(
            p("EUR", "10000000000000.01"),
            Err(MoneyError::TooLarge(_))
        ));
        assert_eq!(p("EUR", "10000000000000.00"), Ok(MAX_MINOR));
    }

    #[test]
    fn sums_stay_exact_and_print_as_decimals() {
        // 0.1 + 0.2 in floating point is 0.30000000000000004; in cents it is 30.
        let c = eur();
        let sum = c.parse_amount("0.1").unwrap() + c.parse_amount("0.2").unwrap();
        assert_eq!(c.major(sum), 0.3);
        assert_eq!(c.decimal(sum), "0.30");
        let million = (0..1_000_000)
            .map(|_| c.parse_amount("59.90").unwrap())
            .sum();
        assert_eq!(c.decimal(million), "59900000.00");
        assert_eq!(c.major(million), 59_900_000.0);
        assert_eq!(
            serde_json::to_string(&c.major(5990 + 3999)).unwrap(),
            "99.89"
        );
        let j = Currency::parse("JPY").unwrap();
        assert_eq!((j.decimal(1200), j.major(1200)), ("1200".into(), 1200.0));
        let b = Currency::parse("BHD").unwrap();
        assert_eq!(b.decimal(5), "0.005");
        assert_eq!(roi(180_000, 120_000), Some(0.5));
        assert_eq!(roi(0, 120_000), Some(-1.0));
        assert_eq!(roi(5, 0), None);
        assert_eq!(format_major("EUR", 179.7), "179.70 EUR");
        assert_eq!(format_major("JPY", 1000.0), "1000 JPY");
    }
}

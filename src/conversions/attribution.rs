//! Attribution, decided in pure functions on the conversion's time: which message (if any) a
//! conversion counts for.
//!
//! - By click id: that click's message, when the click was a person's (a machine hit never
//!   attributes), of a marketing message (a transactional one never does), and made at most
//!   `conversions.window` before the conversion (and not after it).
//! - By address: the person's last human click on a marketing message, across campaigns
//!   (last touch), under the same window.
//!
//! With both, the click id decides; only when it cannot attribute is the address tried.

use crate::track::clickid::{Click, ClickIdError, LastClick};

/// The message a conversion is attributed to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Attribution {
    pub job: String,
    pub campaign: String,
    /// The recipient's address (the click id's, or the one posted).
    #[serde(skip)]
    pub to: String,
    pub link: String,
    pub variant: String,
    /// The message's touch bucket ("" when none).
    pub touch: String,
    /// What attributed it: `click` or `to`.
    pub by: &'static str,
}

/// Why a conversion is not attributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unattributed {
    /// By address: no human click on a marketing message within the window.
    NoClick,
    /// By click id: the click was more than the window before the conversion, or after it.
    OutsideWindow,
    /// The click id is not one this paloma sealed: forged, truncated, or from another key.
    UnknownClick,
    /// The click id is of a machine hit (a link scanner, a proxy).
    MachineClick,
    /// The click id is of a transactional message.
    Transactional,
}

impl Unattributed {
    pub fn as_str(self) -> &'static str {
        match self {
            Unattributed::NoClick => "no_click",
            Unattributed::OutsideWindow => "outside_window",
            Unattributed::UnknownClick => "unknown_click",
            Unattributed::MachineClick => "machine_click",
            Unattributed::Transactional => "transactional",
        }
    }

    /// The sentence the answer gives with it.
    pub fn why(self) -> &'static str {
        match self {
            Unattributed::NoClick => {
                "no human click on a marketing message by this address within conversions.window"
            }
            Unattributed::OutsideWindow => {
                "the click was not within conversions.window before the conversion"
            }
            Unattributed::UnknownClick => "unknown or forged click id",
            Unattributed::MachineClick => {
                "the click id is of a machine hit (a link scanner or proxy), which never attributes"
            }
            Unattributed::Transactional => {
                "the click id is of a transactional message, which never attributes"
            }
        }
    }
}

/// Within the window: the click at most `window` seconds before `at`, not after it (a
/// minute of clock difference between the shop and paloma allowed).
fn within(click_at: i64, at: i64, window: i64) -> bool {
    click_at <= at + 60 && at - click_at <= window
}

/// By click id (`Err`: it did not open).
pub fn by_click(
    click: Result<&Click, &ClickIdError>,
    at: i64,
    window: i64,
) -> Result<Attribution, Unattributed> {
    let c = click.map_err(|_| Unattributed::UnknownClick)?;
    if c.machine {
        return Err(Unattributed::MachineClick);
    }
    if c.transactional {
        return Err(Unattributed::Transactional);
    }
    if !within(c.at, at, window) {
        return Err(Unattributed::OutsideWindow);
    }
    Ok(Attribution {
        job: c.job.clone(),
        campaign: c.campaign.clone(),
        to: crate::values::address_key(&c.to),
        link: c.link.clone(),
        variant: c.variant.clone(),
        touch: c.touch.clone(),
        by: "click",
    })
}

/// By address: `last` is the recipient's `last_human_click`, if any.
pub fn by_address(
    to: &str,
    last: Option<&LastClick>,
    at: i64,
    window: i64,
) -> Result<Attribution, Unattributed> {
    let c = last
        .filter(|c| within(c.at, at, window))
        .ok_or(Unattributed::NoClick)?;
    Ok(Attribution {
        job: c.job.clone(),
        campaign: c.campaign.clone(),
        to: to.to_string(),
        link: c.link.clone(),
        variant: c.variant.clone(),
        touch: c.touch.clone(),
        by: "to",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn click() -> Click {
        Click {
            job: "j1".into(),
            campaign: "spring".into(),
            to: "Ann@Example.com".into(),
            link: "pricing".into(),
            variant: "B".into(),
            touch: "1".into(),
            at: 1_000 * DAY,
            ..Default::default()
        }
    }

    #[test]
    fn a_persons_click_within_the_window_attributes_and_nothing_else_does() {
        let c = click();
        let at = c.at + DAY;
        let a = by_click(Ok(&c), at, 7 * DAY).unwrap();
        assert_eq!(
            (a.job.as_str(), a.to.as_str(), a.by),
            ("j1", "ann@example.com", "click")
        );
        assert_eq!(
            by_click(Ok(&c), c.at + 8 * DAY, 7 * DAY),
            Err(Unattributed::OutsideWindow)
        );
        assert_eq!(
            by_click(Ok(&c), c.at - 3600, 7 * DAY),
            Err(Unattributed::OutsideWindow)
        );
        assert!(
            by_click(Ok(&c), c.at - 30, 7 * DAY).is_ok(),
            "clock skew allowed"
        );
        let m = Click {
            machine: true,
            ..click()
        };
        assert_eq!(
            by_click(Ok(&m), at, 7 * DAY),
            Err(Unattributed::MachineClick)
        );
        let t = Click {
            transactional: true,
            ..click()
        };
        assert_eq!(
            by_click(Ok(&t), at, 7 * DAY),
            Err(Unattributed::Transactional)
        );
        assert_eq!(
            by_click(Err(&ClickIdError::Forged), at, 7 * DAY),
            Err(Unattributed::UnknownClick)
        );
    }

    #[test]
    fn by_address_the_last_human_click_within_the_window() {
        let last = LastClick {
            at: 1_000 * DAY,
            job: "j2".into(),
            campaign: "autumn".into(),
            ..Default::default()
        };
        let a = by_address("bo@example.com", Some(&last), last.at + 6 * DAY, 7 * DAY).unwrap();
        assert_eq!((a.campaign.as_str(), a.by), ("autumn", "to"));
        assert_eq!(
            by_address("bo@example.com", Some(&last), last.at + 8 * DAY, 7 * DAY),
            Err(Unattributed::NoClick)
        );
        assert_eq!(
            by_address("bo@example.com", None, last.at, 7 * DAY),
            Err(Unattributed::NoClick)
        );
    }
}

//! The decision of an experiment, from its per-variant figures: pure, so that it is tested
//! without Redis or a clock.
//!
//! Each variant's rate is its people's unique clicks (or opens) per delivered message;
//! machine hits are never counted (the tracking server keeps them apart). The leader is the
//! variant with the highest rate; it wins if a one-sided two-proportion z-test (pooled
//! variance) against the runner-up gives p < 1 - confidence, and otherwise the fallback is
//! sent. Comparing with the runner-up, the closest competitor, is the strictest pairwise test
//! of the leader.

/// One variant's figures at the decision.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Figures {
    pub variant: String,
    pub delivered: i64,
    /// People's unique clicks or opens (the experiment's metric).
    pub hits: i64,
    pub rate: f64,
}

/// What the test found.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Verdict {
    /// The variant to send to the rest.
    pub winner: String,
    /// The best rate's variant (the winner when significant).
    pub leader: String,
    /// One-sided p-value of the leader against the runner-up (1 when there is nothing to
    /// compare).
    pub p_value: f64,
    pub significant: bool,
    pub variants: Vec<Figures>,
}

/// Judges `variants` (name, delivered, hits) at `confidence` (0.95 for 95%).
pub fn judge(variants: &[(String, i64, i64)], confidence: f64, fallback: &str) -> Verdict {
    let figures: Vec<Figures> = variants
        .iter()
        .map(|(v, delivered, hits)| Figures {
            variant: v.clone(),
            delivered: *delivered,
            hits: (*hits).min(*delivered).max(0),
            rate: if *delivered > 0 {
                (*hits).min(*delivered).max(0) as f64 / *delivered as f64
            } else {
                0.0
            },
        })
        .collect();
    let mut order: Vec<&Figures> = figures.iter().collect();
    // Highest rate first; ties go to the variant listed first (stable sort).
    order.sort_by(|a, b| b.rate.total_cmp(&a.rate));
    let (leader, p_value) = match order.as_slice() {
        [first, second, ..] => (first.variant.clone(), p_one_sided(first, second)),
        [only] => (only.variant.clone(), 1.0),
        [] => (fallback.to_string(), 1.0),
    };
    let significant = p_value < 1.0 - confidence;
    Verdict {
        winner: if significant {
            leader.clone()
        } else {
            fallback.to_string()
        },
        leader,
        p_value,
        significant,
        variants: figures,
    }
}

/// One variant's revenue figures: delivered messages, people who converted, revenue (major
/// units of the experiment's currency), and over the delivered messages the sum and sum of
/// squares of `ln(1 + revenue of the message)` (messages without revenue add 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Revenue {
    pub variant: String,
    pub delivered: i64,
    pub people: i64,
    pub revenue: f64,
    pub log_sum: f64,
    pub log_squares: f64,
}

/// Judges on revenue per delivered message. Order values are heavy-tailed (a few large
/// orders next to many small ones and mostly none), so the plain mean would follow the
/// one whale; the test compares the mean of `ln(1 + revenue)` per delivered message
/// instead, with Welch's unequal-variance test (normal approximation: the samples are
/// every delivered message, hundreds at least), one-sided, leader against runner-up. The
/// log keeps zeros at zero and orders of magnitude apart while taming the tail. `rate` in
/// the answer is the plain revenue per delivered message, `hits` the people who converted.
pub fn judge_revenue(variants: &[Revenue], confidence: f64, fallback: &str) -> Verdict {
    let log_mean = |r: &Revenue| {
        if r.delivered > 0 {
            r.log_sum / r.delivered as f64
        } else {
            0.0
        }
    };
    let mut order: Vec<&Revenue> = variants.iter().collect();
    order.sort_by(|a, b| log_mean(b).total_cmp(&log_mean(a)));
    let (leader, p_value) = match order.as_slice() {
        [first, second, ..] => (first.variant.clone(), p_welch(first, second)),
        [only] => (only.variant.clone(), 1.0),
        [] => (fallback.to_string(), 1.0),
    };
    let significant = p_value < 1.0 - confidence;
    Verdict {
        winner: if significant {
            leader.clone()
        } else {
            fallback.to_string()
        },
        leader,
        p_value,
        significant,
        variants: variants
            .iter()
            .map(|r| Figures {
                variant: r.variant.clone(),
                delivered: r.delivered,
                hits: r.people,
                rate: if r.delivered > 0 {
                    r.revenue / r.delivered as f64
                } else {
                    0.0
                },
            })
            .collect(),
    }
}

/// One-sided p of Welch's test that `a`'s mean log revenue exceeds `b`'s.
fn p_welch(a: &Revenue, b: &Revenue) -> f64 {
    let stats = |r: &Revenue| {
        let n = r.delivered as f64;
        let mean = r.log_sum / n;
        let var = ((r.log_squares - n * mean * mean) / (n - 1.0)).max(0.0);
        (n, mean, var)
    };
    if a.delivered < 2 || b.delivered < 2 {
        return 1.0;
    }
    let ((n1, m1, v1), (n2, m2, v2)) = (stats(a), stats(b));
    let se = (v1 / n1 + v2 / n2).sqrt();
    if se == 0.0 || !se.is_finite() {
        return 1.0;
    }
    0.5 * libm::erfc((m1 - m2) / se / std::f64::consts::SQRT_2)
}

/// P(Z ≥ z) for the difference of the two rates under the pooled null hypothesis.
fn p_one_sided(a: &Figures, b: &Figures) -> f64 {
    let (n1, n2) = (a.delivered as f64, b.delivered as f64);
    if n1 < 1.0 || n2 < 1.0 {
        return 1.0;
    }
    let pooled = (a.hits + b.hits) as f64 / (n1 + n2);
    let se = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
    if se == 0.0 || !se.is_finite() {
        return 1.0;
    }
    let z = (a.rate - b.rate) / se;
    0.5 * libm::erfc(z / std::f64::consts::SQRT_2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(name: &str, delivered: i64, hits: i64) -> (String, i64, i64) {
        (name.to_string(), delivered, hits)
    }

    #[test]
    fn a_clear_leader_wins_and_a_close_race_falls_back() {
        // 40/200 against 10/200: z ≈ 4.74.
        let d = judge(
            &[v("a", 200, 10), v("b", 200, 40), v("c", 200, 12)],
            0.95,
            "a",
        );
        assert_eq!((d.winner.as_str(), d.significant), ("b", true));
        assert!(d.p_value < 1e-4, "{}", d.p_value);
        // 22/200 against 20/200: nowhere near 95%.
        let d = judge(
            &[v("a", 200, 20), v("b", 200, 22), v("c", 200, 19)],
            0.95,
            "a",
        );
        assert_eq!(
            (d.winner.as_str(), d.leader.as_str(), d.significant),
            ("a", "b", false)
        );
        assert!(d.p_value > 0.3);
    }

    #[test]
    fn the_p_value_matches_the_textbook_figure() {
        // 60/500 vs 40/500: pooled 0.1, se = sqrt(0.1*0.9*2/500) = 0.018974; z = 2.1082;
        // one-sided p = 0.0175: significant at 95%, not at 99%.
        let d = judge(&[v("a", 500, 60), v("b", 500, 40)], 0.95, "b");
        assert!((d.p_value - 0.0175).abs() < 0.0005, "{}", d.p_value);
        assert!(d.significant && d.winner == "a");
        let d = judge(&[v("a", 500, 60), v("b", 500, 40)], 0.99, "b");
        assert!(!d.significant && d.winner == "b");
    }

    /// A variant's figures from its messages' revenues (the rest of `delivered` had none).
    fn rev(name: &str, delivered: i64, orders: &[f64]) -> Revenue {
        Revenue {
            variant: name.into(),
            delivered,
            people: orders.len() as i64,
            revenue: orders.iter().sum(),
            log_sum: orders.iter().map(|r| (1.0 + r).ln()).sum(),
            log_squares: orders.iter().map(|r| (1.0 + r).ln().powi(2)).sum(),
        }
    }

    #[test]
    fn revenue_is_judged_on_the_typical_order_not_one_whale() {
        // B converts 60 of 1,000 at about 50 EUR; A 30 of 1,000, one of them 5,000 EUR:
        // A's plain revenue is higher, but B is the better variant, and wins.
        let b: Vec<f64> = (0..60).map(|i| 45.0 + i as f64 / 6.0).collect();
        let mut a: Vec<f64> = (0..29).map(|i| 45.0 + i as f64 / 6.0).collect();
        a.push(5000.0);
        let d = judge_revenue(&[rev("A", 1000, &a), rev("B", 1000, &b)], 0.95, "A");
        assert!(d.variants[0].rate > d.variants[1].rate, "{d:?}");
        assert_eq!((d.winner.as_str(), d.significant), ("B", true), "{d:?}");
        assert_eq!(d.variants[1].hits, 60);
        // The same revenue spread evenly: no winner.
        let d = judge_revenue(&[rev("A", 1000, &b), rev("B", 1000, &b)], 0.95, "A");
        assert_eq!((d.winner.as_str(), d.significant), ("A", false));
        let d = judge_revenue(&[rev("A", 0, &[]), rev("B", 1, &[10.0])], 0.95, "A");
        assert!(!d.significant);
    }

    #[test]
    fn nothing_delivered_or_nothing_clicked_is_never_significant() {
        let d = judge(&[v("a", 0, 0), v("b", 0, 0)], 0.95, "b");
        assert_eq!((d.winner.as_str(), d.significant), ("b", false));
        let d = judge(&[v("a", 300, 0), v("b", 300, 0)], 0.95, "b");
        assert_eq!(d.p_value, 1.0);
        // More hits than deliveries (a forwarded mail clicked by many) is capped.
        let d = judge(&[v("a", 10, 50), v("b", 10, 0)], 0.95, "b");
        assert_eq!(d.variants[0].rate, 1.0);
    }
}

//! The report's HTML. Every value from Redis or the config is escaped; the only markup not
//! written here is the charts' SVG (plotters), inlined.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::{charts, Report};
use crate::render::escape_html as esc;
use crate::stats::{CampaignRow, CampaignStats};

const STYLE: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1f2937;background:#f8fafc}
main{max-width:1040px;margin:0 auto;padding:16px}
h1{font-size:1.5rem;margin:.4rem 0}h2{font-size:1.1rem;margin:1.6rem 0 .6rem}
a{color:#1d4ed8}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:12px 16px;margin:12px 0}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.92rem}
th,td{text-align:right;padding:6px 8px;border-bottom:1px solid #eef0f3;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
th{color:#6b7280;font-weight:600}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;font-size:.8rem;background:#e5e7eb}
.active{background:#dcfce7;color:#166534}.paused{background:#fef3c7;color:#92400e}.cancelled{background:#fee2e2;color:#991b1b}
.funnel .row{display:flex;align-items:center;gap:8px;margin:6px 0}
.funnel .label{width:110px;flex:none}
.funnel .track{flex:1;min-width:0}
.funnel .bar{display:block;height:22px;background:#2563eb;border-radius:4px;min-width:2px}
.funnel .n{flex:none;width:7.5em;font-variant-numeric:tabular-nums}
.side{display:flex;flex-wrap:wrap;gap:8px;margin-top:10px}
.side div{background:#f1f5f9;border-radius:6px;padding:6px 10px;font-size:.9rem}
.warn td{background:#fff7ed}
svg{max-width:100%;height:auto}
.muted{color:#6b7280;font-size:.85rem}
form input{font-size:1rem;padding:8px;width:100%;max-width:420px;box-sizing:border-box}
form button{font-size:1rem;padding:8px 16px;margin-top:8px}
";

fn layout(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{} · paloma</title><style>{STYLE}</style></head><body><main>{body}</main></body></html>",
        esc(title)
    )
}

/// Percent-encodes everything but unreserved characters and `/`.
pub fn url_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Percent-encodes one path segment: everything but unreserved characters, `/` included,
/// so a name always stays one segment of the URL it is put in.
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The report page of campaign `c`.
pub fn campaign_href(c: &str) -> String {
    format!("/campaigns/{}", segment(c))
}

fn pct(n: i64, of: i64) -> String {
    if of <= 0 {
        "–".into()
    } else {
        format!("{:.1}%", n as f64 * 100.0 / of as f64)
    }
}

pub fn message(title: &str, text: &str) -> String {
    layout(
        title,
        &format!(
            "<h1>{}</h1><p>{}</p><p><a href=\"/campaigns\">Campaigns</a></p>",
            esc(title),
            esc(text)
        ),
    )
}

pub fn login(next: &str, failed: bool) -> String {
    let error = if failed {
        "<p class=\"badge cancelled\" role=\"alert\">That token does not open the report.</p>"
    } else {
        ""
    };
    layout(
        "Sign in",
        &format!(
            "<h1>paloma report</h1><div class=\"card\"><form method=\"post\" action=\"/login\">{error}<label for=\"token\">API or report token</label><br><input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required><input type=\"hidden\" name=\"next\" value=\"{}\"><br><button type=\"submit\">Open the report</button></form></div>",
            esc(next)
        ),
    )
}

fn state_badge(state: &str) -> String {
    format!("<span class=\"badge {0}\">{0}</span>", esc(state))
}

/// One page of the campaigns; `next`: the cursor of the next page, if any.
pub fn list(rows: &[CampaignRow], next: Option<&str>) -> String {
    let mut t = String::from(
        "<h1>Campaigns</h1><div class=\"card scroll\"><table id=\"campaigns\"><thead><tr><th>campaign</th><th>state</th><th>enqueued</th><th>delivered</th><th>opened</th><th>clicked</th><th>bounced</th><th>complaints</th></tr></thead><tbody>",
    );
    for r in rows {
        let s = &r.stats;
        let _ = write!(
            t,
            "<tr><td><a href=\"{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&campaign_href(&s.campaign)),
            esc(&s.campaign),
            state_badge(r.state.as_str()),
            s.accepted,
            s.delivered,
            pct(s.unique_opened, s.delivered),
            pct(s.unique_clicked, s.delivered),
            s.bounced,
            s.complained
        );
    }
    if rows.is_empty() {
        t.push_str("<tr><td colspan=\"8\">No campaign has an outcome yet.</td></tr>");
    }
    t.push_str("</tbody></table></div>");
    if let Some(n) = next {
        let _ = write!(
            t,
            "<p><a id=\"next\" href=\"/campaigns?after={}\">Next campaigns →</a></p>",
            segment(n)
        );
    }
    t.push_str(
        "<form method=\"post\" action=\"/logout\"><button type=\"submit\">Sign out</button></form>",
    );
    layout("Campaigns", &t)
}

fn funnel(s: &CampaignStats) -> String {
    let top = s.accepted.max(s.delivered).max(1);
    let mut f = String::from("<div class=\"card funnel\" id=\"funnel\">");
    for (label, n, of) in [
        ("enqueued", s.accepted, None),
        ("delivered", s.delivered, Some(s.accepted)),
        ("opened", s.unique_opened, Some(s.delivered)),
        ("clicked", s.unique_clicked, Some(s.delivered)),
        ("converted", s.conversions.people, Some(s.delivered)),
    ] {
        let width = (n as f64 * 100.0 / top as f64).clamp(0.0, 100.0);
        let share = of.map(|o| format!(" ({})", pct(n, o))).unwrap_or_default();
        let _ = write!(
            f,
            "<div class=\"row\" data-step=\"{label}\"><span class=\"label\">{label}</span><span class=\"track\"><span class=\"bar\" style=\"width:{width:.1}%\"></span></span><span class=\"n\">{n}{share}</span></div>"
        );
    }
    f.push_str("<div class=\"side\">");
    for (label, n) in [
        ("bounced", s.bounced),
        ("returned later", s.returned),
        ("complained", s.complained),
        ("unsubscribed", s.unsubscribed),
        ("suppressed", s.suppressed),
        ("failed", s.failed),
        ("dead", s.dead),
        ("waiting", s.queued),
    ] {
        let _ = write!(f, "<div>{label} <b>{n}</b></div>");
    }
    for (cur, v) in &s.conversions.revenue {
        let _ = write!(
            f,
            "<div data-revenue=\"{0}\">revenue <b>{1}</b></div>",
            esc(cur),
            money(cur, *v)
        );
    }
    let _ = write!(
        f,
        "</div><p class=\"muted\">Opened, clicked and converted: people, once per message (machine hits — scanners, image proxies — apart: {} opens, {} clicks; they never convert).</p></div>",
        s.opened_machine, s.clicked_machine
    );
    f
}

/// An amount in its currency's major units (`299.50 EUR`).
fn money(currency: &str, v: f64) -> String {
    let digits = crate::conversions::Currency::parse(currency).map_or(2, |c| c.exponent()) as usize;
    format!("{v:.digits$} {}", esc(currency))
}

/// Revenue by currency, as one cell's text.
fn revenue(r: &BTreeMap<String, f64>) -> String {
    if r.is_empty() {
        return "–".into();
    }
    r.iter()
        .map(|(c, v)| money(c, *v))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Revenue per message by currency, to a hundredth of a cent (`4.9917 EUR`).
fn per_message(r: &BTreeMap<String, f64>) -> String {
    if r.is_empty() {
        return "–".into();
    }
    r.iter()
        .map(|(c, v)| format!("{v:.4} {}", esc(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Conversions and ROI per currency: what the campaign earned against what it cost.
fn roi(s: &CampaignStats) -> String {
    let c = &s.conversions;
    let mut t = String::from("<h2>Conversions and ROI</h2><div class=\"card scroll\" id=\"roi\">");
    if c.count == 0 && c.cost.is_empty() {
        t.push_str("<p class=\"muted\">No conversion reported yet (the shop posts them to POST /api/v1/conversions).</p></div>");
        return t;
    }
    let _ = write!(
        t,
        "<p><b>{}</b> conversions by <b>{}</b> people.</p><table><thead><tr><th>currency</th><th>revenue</th><th>cost</th><th>ROI</th></tr></thead><tbody>",
        c.count, c.people
    );
    let currencies: std::collections::BTreeSet<&String> =
        c.revenue.keys().chain(c.cost.keys()).collect();
    for cur in currencies {
        let rev = c.revenue.get(cur).copied().unwrap_or(0.0);
        let cost = c.cost.get(cur).map_or("–".to_string(), |v| money(cur, *v));
        let roi = c
            .roi
            .get(cur)
            .map_or("–".to_string(), |r| format!("{:.1}%", r * 100.0));
        let _ = write!(
            t,
            "<tr data-currency=\"{0}\"><td>{0}</td><td>{1}</td><td>{cost}</td><td class=\"roi\">{roi}</td></tr>",
            esc(cur),
            money(cur, rev)
        );
    }
    t.push_str("</tbody></table><p class=\"muted\">ROI = (revenue − cost) / cost, in each currency a cost is set in (PUT /api/v1/campaigns/{c}/cost).</p></div>");
    t
}

fn svg(chart: Result<String, charts::ChartError>, w: u32, h: u32) -> String {
    match chart {
        Ok(s) if !s.contains("viewBox") => {
            s.replacen("<svg ", &format!("<svg viewBox=\"0 0 {w} {h}\" "), 1)
        }
        Ok(s) => s,
        Err(e) => format!(
            "<p class=\"muted\">chart unavailable: {}</p>",
            esc(&e.to_string())
        ),
    }
}

fn variants(s: &CampaignStats) -> String {
    if s.variants.is_empty() {
        return String::new();
    }
    let mut t = String::from("<h2>Variants</h2><div class=\"card scroll\"><table id=\"variants\"><thead><tr><th>variant</th><th>delivered</th><th>opened</th><th>clicked</th><th>click rate</th><th>machine hits</th></tr></thead><tbody>");
    let winner = s
        .experiment
        .as_ref()
        .and_then(|x| x.get("winner")?.as_str().map(str::to_string));
    for (v, f) in &s.variants {
        let g = |k: &str| f.get(k).copied().unwrap_or(0);
        let mark = if winner.as_deref() == Some(v.as_str()) {
            " ★ winner"
        } else {
            ""
        };
        let _ = write!(
            t,
            "<tr><td>{}{mark}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(v),
            g("delivered"),
            g("unique_opened"),
            g("unique_clicked"),
            pct(g("unique_clicked"), g("delivered")),
            g("opened_machine") + g("clicked_machine")
        );
    }
    t.push_str("</tbody></table>");
    match &s.experiment {
        Some(x) if x.get("winner").is_some() => {
            let r = &x["result"];
            let _ = write!(
                t,
                "<p id=\"decision\">Decided: <b>{}</b> ({}) — {} at {}% confidence, p = {}, by people's unique {} per delivered.</p>",
                esc(x["winner"].as_str().unwrap_or("")),
                esc(x["how"].as_str().unwrap_or("")),
                if r["significant"].as_bool() == Some(true) {
                    "significant"
                } else {
                    "not significant"
                },
                r["confidence"].as_f64().map_or("–".into(), |c| format!("{:.0}", c * 100.0)),
                r["p_value"].as_f64().map_or("–".into(), |p| format!("{p:.4}")),
                esc(r["metric"].as_str().unwrap_or("clicks"))
            );
        }
        _ => t.push_str("<p id=\"decision\">Testing: no winner yet.</p>"),
    }
    t.push_str("</div>");
    t
}

pub fn campaign(r: &Report) -> String {
    let s = &r.row.stats;
    let mut b = format!(
        "<p><a href=\"/campaigns\">← Campaigns</a></p><h1>{} {}</h1>",
        esc(&s.campaign),
        state_badge(r.row.state.as_str())
    );
    if r.row.parked > 0 {
        let _ = write!(b, "<p>{} jobs wait while it is paused.</p>", r.row.parked);
    }
    b.push_str(&funnel(s));

    b.push_str("<h2>Opens and clicks over time</h2><div class=\"card\" id=\"timeline\">");
    if r.timeline.is_empty() {
        b.push_str("<p class=\"muted\">No opens or clicks yet.</p>");
    }
    b.push_str(&svg(charts::timeline(&r.timeline), 720, 300));
    b.push_str("</div>");

    b.push_str(&roi(s));

    b.push_str("<h2>Links</h2><div class=\"card scroll\"><table id=\"links\"><thead><tr><th>link</th><th>clicks</th><th>people</th><th>conversions</th><th>revenue</th></tr></thead><tbody>");
    let mut links = s.links.clone();
    links.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (l, total, unique) in &links {
        let conv = s.conversions.link.get(l);
        let _ = write!(
            b,
            "<tr data-link=\"{0}\"><td>{0}</td><td>{total}</td><td>{unique}</td><td>{1}</td><td class=\"revenue\">{2}</td></tr>",
            esc(l),
            conv.map_or(0, |c| c.count),
            conv.map_or("–".to_string(), |c| revenue(&c.revenue))
        );
    }
    if links.is_empty() {
        b.push_str("<tr><td colspan=\"5\">No named link clicked yet.</td></tr>");
    }
    b.push_str("</tbody></table></div>");

    b.push_str(&variants(s));

    b.push_str("<h2>Delivery by recipient domain</h2><div class=\"card scroll\"><table id=\"domains\"><thead><tr><th>domain</th><th>delivered</th><th>deferred</th><th>bounced</th><th>not delivered</th></tr></thead><tbody>");
    for (d, delivered, deferred, bounced) in &r.domains {
        let all = delivered + deferred + bounced;
        let bad = deferred + bounced;
        let class = if all >= 10 && bad * 5 > all {
            " class=\"warn\""
        } else {
            ""
        };
        let _ = write!(
            b,
            "<tr{class}><td>{}</td><td>{delivered}</td><td>{deferred}</td><td>{bounced}</td><td>{}</td></tr>",
            esc(d),
            pct(bad, all)
        );
    }
    if r.domains.is_empty() {
        b.push_str("<tr><td colspan=\"5\">Nothing sent yet.</td></tr>");
    }
    b.push_str("</tbody></table><p class=\"muted\">Deferred counts attempts put back for a retry; a domain where more than one in five is not delivered is marked.</p></div>");

    b.push_str("<h2>Contact pressure</h2><div class=\"card\" id=\"touches\">");
    let points: Vec<(String, f64, f64)> = r
        .touches
        .iter()
        .map(|t| {
            (
                t.bucket.clone(),
                t.click_rate * 100.0,
                t.unsubscribe_rate * 100.0,
            )
        })
        .collect();
    b.push_str(&svg(charts::touches(&points), 720, 300));
    // In money too: revenue per delivered at each level, in the campaign's main currency.
    if let Some((cur, _)) = s
        .conversions
        .revenue
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
    {
        let money: Vec<(String, f64)> = r
            .touches
            .iter()
            .map(|t| {
                (
                    t.bucket.clone(),
                    t.revenue_per_delivered.get(cur).copied().unwrap_or(0.0),
                )
            })
            .collect();
        b.push_str("<div id=\"touch-revenue\">");
        b.push_str(&svg(charts::revenue_by_touch(&money, cur), 720, 300));
        b.push_str("</div>");
    }
    b.push_str("<div class=\"scroll\"><table><thead><tr><th>Nth message of the year</th><th>recipients</th><th>opened</th><th>clicked</th><th>unsubscribed</th><th>complained</th><th>converted</th><th>revenue per delivered</th></tr></thead><tbody>");
    for t in &r.touches {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{:.1}%</td><td>{:.1}%</td><td>{:.2}%</td><td>{:.3}%</td><td>{}</td><td>{}</td></tr>",
            esc(&t.bucket),
            t.recipients,
            t.open_rate * 100.0,
            t.click_rate * 100.0,
            t.unsubscribe_rate * 100.0,
            t.complaint_rate * 100.0,
            t.converted,
            per_message(&t.revenue_per_delivered)
        );
    }
    b.push_str("</tbody></table></div></div>");
    layout(&s.campaign, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_stays_one_path_segment() {
        assert_eq!(campaign_href("spring-2.v1"), "/campaigns/spring-2.v1");
        assert_eq!(campaign_href("a/b/../c"), "/campaigns/a%2Fb%2F..%2Fc");
        assert_eq!(campaign_href("<script>x"), "/campaigns/%3Cscript%3Ex");
        assert_eq!(segment("a b?c#d&e"), "a%20b%3Fc%23d%26e");
    }

    #[test]
    fn the_report_shows_conversions_revenue_and_roi() {
        let h: std::collections::BTreeMap<String, i64> = [
            ("count", 4),
            ("people", 2),
            ("rev:EUR", 10000),
            ("cost:EUR", 8000),
            ("link:pricing:count", 2),
            ("link:pricing:rev:EUR", 5990),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let stats = CampaignStats {
            campaign: "shop".into(),
            accepted: 4,
            delivered: 4,
            unique_clicked: 2,
            links: vec![("pricing".into(), 3, 2)],
            conversions: crate::conversions::figures::Figures::from_hash(&h),
            ..Default::default()
        };
        let r = Report {
            row: crate::stats::CampaignRow {
                state: crate::control::State::Active,
                parked: 0,
                stats,
            },
            timeline: Vec::new(),
            domains: Vec::new(),
            touches: Vec::new(),
        };
        let page = campaign(&r);
        assert!(page.contains("data-step=\"converted\""), "{page}");
        assert!(page.contains("revenue <b>100.00 EUR</b>"), "{page}");
        assert!(page.contains("<td class=\"roi\">25.0%</td>"), "{page}");
        assert!(
            page.contains("<td>pricing</td><td>3</td><td>2</td><td>2</td><td class=\"revenue\">59.90 EUR</td>"),
            "{page}"
        );
    }
}

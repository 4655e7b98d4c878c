//! Per-message CPU cost of the render path: job JSON parse + Handlebars + link rewriting +
//! MIME, with and without DKIM (RSA-2048, Ed25519), for three message sizes; and the
//! token signing that every tracked link costs.
//!
//! `cargo bench --bench render`

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::process::Command;

use criterion::{criterion_group, Criterion, Throughput};
use paloma::config::{DkimSettings, Settings};
use paloma::job::Job;
use paloma::render::{DkimKeys, Renderer, Templates};
use paloma::track::token::{Kind, Signer};

fn settings(dkim: Vec<DkimSettings>) -> Settings {
    let mut s = Settings::from_toml(
        r#"
[sender]
from = "Shop <news@shop.example>"
helo = "mta.shop.example"
[tracking]
base_url = "https://t.shop.example"
secret = "bench-secret-0123456789"
"#,
        Vec::new(),
    )
    .unwrap();
    s.dkim = dkim;
    s
}

fn job(products: usize) -> String {
    let items: Vec<_> = (0..products)
        .map(|i| {
            serde_json::json!({"name": format!("Product {i} — linen & cotton"), "price": "29.90",
                "url": format!("https://shop.example/p/{i}?utm_source=mail&utm_campaign=spring"),
                "description": "A long-lasting piece, cut from European linen, washed for softness."})
        })
        .collect();
    serde_json::json!({"id": "bench-1", "campaign": "spring", "template": "newsletter",
        "to": "ana.garcia@example.com", "to_name": "Ana García",
        "data": {"first_name": "Ana", "products": items}})
    .to_string()
}

/// A newsletter body with 30 tracked links.
fn links_html() -> String {
    let mut html = String::from("<html><body><h1>Spring</h1>");
    for i in 0..30 {
        html.push_str(&format!(
            "<p>Item {i}: a sturdy thing &amp; more. <a href=\"https://shop.example/p/{i}?utm_source=mail&amp;utm_medium=email\" data-paloma-link=\"item-{i}\" class=\"btn\">Buy {i}</a></p>\n"
        ));
    }
    html.push_str("<a href=\"mailto:help@shop.example\">help</a></body></html>");
    html
}

/// Handlebars alone on the newsletter's html.hbs (our escaping), with the context the
/// renderer would build for job `raw`.
fn newsletter_handlebars(raw: &str) -> (handlebars::Handlebars<'static>, handlebars::Context) {
    let mut hb = handlebars::Handlebars::new();
    hb.register_escape_fn(paloma::render::escape_html);
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/newsletter/html.hbs"),
    )
    .unwrap();
    hb.register_template_string("html", src).unwrap();
    let data: serde_json::Value = serde_json::from_str(raw).unwrap();
    let mut ctx_data = data["data"].clone();
    for k in ["to", "campaign", "id"] {
        ctx_data[k] = data[k].clone();
    }
    ctx_data["unsubscribe_url"] = "https://t.shop.example/u/0.abc.def".into();
    (hb, handlebars::Context::from(ctx_data))
}

fn keys(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let rsa = dir.join("rsa.pem");
    let ed = dir.join("ed.pem");
    for (args, out) in [
        (
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ][..],
            &rsa,
        ),
        (&["genpkey", "-algorithm", "ed25519", "-out"][..], &ed),
    ] {
        let st = Command::new("openssl")
            .args(args)
            .arg(out)
            .status()
            .expect("openssl (apt-get install openssl)");
        assert!(
            st.success(),
            "openssl {args:?} failed: the DKIM figures need its keys"
        );
    }
    (rsa, ed)
}

fn renderer(dkim: Vec<DkimSettings>) -> Renderer {
    let s = settings(dkim);
    let templates = Templates::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("templates"),
        false,
    )
    .unwrap();
    let dkim = DkimKeys::load(&s.dkim).unwrap();
    Renderer::new(&s, templates, dkim).unwrap()
}

fn bench(c: &mut Criterion) {
    let tmp = std::env::temp_dir().join(format!("paloma-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let plain = renderer(Vec::new());
    let (rsa, ed) = keys(&tmp);
    let mk = |key| {
        vec![DkimSettings {
            domain: "shop.example".into(),
            selector: "s1".into(),
            key,
        }]
    };
    let signed = (renderer(mk(rsa)), renderer(mk(ed)));

    // Where the newsletter's time goes: the job's JSON, Handlebars alone on html.hbs (the
    // prescribed engine, with our escaping), and subject + HTML + links + text (`parts`);
    // the rest of parse+render+mime below is MIME.
    let mut g = c.benchmark_group("stages");
    g.throughput(Throughput::Elements(1));
    let raw = job(6);
    g.bench_function("newsletter: job JSON parse", |b| {
        b.iter(|| black_box(Job::parse(black_box(raw.as_bytes()), 1 << 20).unwrap()))
    });
    let (hb, ctx) = newsletter_handlebars(&raw);
    g.bench_function("newsletter: handlebars html.hbs only", |b| {
        b.iter(|| black_box(hb.render_with_context("html", &ctx).unwrap().len()))
    });
    g.bench_function(
        "newsletter: parse + parts (subject, html, links, text)",
        |b| {
            b.iter(|| {
                let mut j = Job::parse(black_box(raw.as_bytes()), 1 << 20).unwrap();
                let u = plain.unsubscribe_url(&j);
                black_box(plain.parts(&mut j, &u).unwrap().html.len())
            })
        },
    );
    g.finish();

    let mut g = c.benchmark_group("render");
    for (label, products) in [("small", 1), ("newsletter", 6), ("large", 40)] {
        let raw = job(products);
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        {
            let mut j = Job::parse(raw.as_bytes(), 1 << 20).unwrap();
            plain.render(&mut j, &mut out, &mut scratch).unwrap();
        }
        g.throughput(Throughput::Elements(1));
        let size = out.len();
        g.bench_function(
            format!("{label} ({} KB) parse+render+mime", size / 1024),
            |b| {
                b.iter(|| {
                    let mut j = Job::parse(black_box(raw.as_bytes()), 1 << 20).unwrap();
                    plain.render(&mut j, &mut out, &mut scratch).unwrap();
                    black_box(out.len())
                })
            },
        );
        for (alg, r) in [("rsa2048", &signed.0), ("ed25519", &signed.1)] {
            g.bench_function(
                format!("{label} ({} KB) parse+render+mime+dkim-{alg}", size / 1024),
                |b| {
                    b.iter(|| {
                        let mut j = Job::parse(black_box(raw.as_bytes()), 1 << 20).unwrap();
                        r.render(&mut j, &mut out, &mut scratch).unwrap();
                        black_box(out.len())
                    })
                },
            );
        }
    }
    g.finish();

    // Link rewriting alone: a newsletter body with 30 tracked links and the pixel.
    let html = links_html();
    let rw_signer = Signer::new("1", "bench-secret-0123456789", &HashMap::new());
    let who = paloma::render::html::LinkOwner {
        id: "bench-1",
        campaign: "spring",
        to: "ana@example.com",
        sent: "1795000000",
        variant: "",
        touch: "",
        transactional: false,
    };
    let mut g = c.benchmark_group("links");
    g.throughput(Throughput::Elements(1));
    let mut out = String::new();
    g.bench_function("rewrite 30 links + pixel", |b| {
        b.iter(|| {
            out.clear();
            paloma::render::html::rewrite(
                black_box(&html),
                "https://t.shop.example",
                &rw_signer,
                &who,
                &mut out,
            );
            black_box(out.len())
        })
    });
    g.bench_function("text part from html (30 links)", |b| {
        b.iter(|| black_box(paloma::render::html::to_text(black_box(&html)).len()))
    });
    g.bench_function("rewrite + text part in one pass (30 links)", |b| {
        b.iter(|| {
            out.clear();
            let text = paloma::render::html::rewrite_and_text(
                black_box(&html),
                "https://t.shop.example",
                &rw_signer,
                &who,
                &mut out,
            );
            black_box(out.len() + text.len())
        })
    });
    g.finish();

    // The shaping layer per message: rule lookup and an admission check (no rate, and a rate
    // high enough never to wait).
    let shaper = paloma::shape::Shaper::new(&settings(Vec::new()));
    let limited =
        paloma::shape::RuleState::new("bench", Some("1000000/s".parse().unwrap()), 10, 100);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("shaping");
    g.throughput(Throughput::Elements(1));
    g.bench_function("rule lookup + admit (no rate)", |b| {
        b.iter(|| {
            let (rule, _) = shaper.rule_and_key(black_box("example.com"), &["mx1.example.com"]);
            black_box(rt.block_on(rule.admit("example.com")))
        })
    });
    g.bench_function("admit (rated domain)", |b| {
        b.iter(|| black_box(rt.block_on(limited.admit(black_box("example.com")))))
    });
    g.finish();

    let signer = Signer::new("1", "bench-secret-0123456789", &HashMap::new());
    let mut g = c.benchmark_group("token");
    g.throughput(Throughput::Elements(1));
    let mut s = String::with_capacity(512);
    g.bench_function("sign click token", |b| {
        b.iter(|| {
            s.clear();
            signer.sign_into(
                &mut s,
                Kind::Click,
                black_box(&[
                    "bench-1",
                    "spring",
                    "ana@example.com",
                    "https://shop.example/p/1?utm_source=mail",
                    "buy",
                ]),
            );
            black_box(s.len())
        })
    });
    let t = signer.sign(
        Kind::Click,
        &[
            "bench-1",
            "spring",
            "ana@example.com",
            "https://shop.example/p/1",
            "buy",
        ],
    );
    g.bench_function("verify click token", |b| {
        b.iter(|| black_box(signer.verify(black_box(&t)).unwrap()))
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&tmp);
}

criterion_group!(benches, bench);

/// `PALOMA_RENDER_STAGE=<stage> PALOMA_RENDER_ITERS=<n>`: runs one stage n times and nothing
/// else, for instruction counts that do not depend on the machine's load:
/// `valgrind --tool=callgrind` at n = 0 and n = 1000, difference / 1000 = instructions per
/// message. Stages: parse, handlebars, parts, render (newsletter), links (30 links, one pass).
fn count_mode(stage: &str, iters: usize) {
    let r = renderer(Vec::new());
    let raw = job(6);
    let (hb, ctx) = newsletter_handlebars(&raw);
    let html = links_html();
    let signer = Signer::new("1", "bench-secret-0123456789", &HashMap::new());
    let who = paloma::render::html::LinkOwner {
        id: "bench-1",
        campaign: "spring",
        to: "ana@example.com",
        sent: "1795000000",
        variant: "",
        touch: "",
        transactional: false,
    };
    let (mut out, mut scratch, mut s) = (Vec::new(), Vec::new(), String::new());
    let mut total = 0;
    for _ in 0..iters {
        total += match stage {
            "parse" => Job::parse(black_box(raw.as_bytes()), 1 << 20)
                .unwrap()
                .to
                .as_str()
                .len(),
            "handlebars" => hb.render_with_context("html", &ctx).unwrap().len(),
            "parts" => {
                let mut j = Job::parse(black_box(raw.as_bytes()), 1 << 20).unwrap();
                let u = r.unsubscribe_url(&j);
                r.parts(&mut j, &u).unwrap().html.len()
            }
            "render" => {
                let mut j = Job::parse(black_box(raw.as_bytes()), 1 << 20).unwrap();
                r.render(&mut j, &mut out, &mut scratch).unwrap();
                out.len()
            }
            "links" => {
                s.clear();
                let t = paloma::render::html::rewrite_and_text(
                    black_box(&html),
                    "https://t.shop.example",
                    &signer,
                    &who,
                    &mut s,
                );
                s.len() + t.len()
            }
            other => panic!("unknown stage {other}"),
        };
    }
    println!("{stage}: {iters} iterations ({total} bytes)");
}

fn main() {
    if let Ok(stage) = std::env::var("PALOMA_RENDER_STAGE") {
        let iters = std::env::var("PALOMA_RENDER_ITERS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1000);
        count_mode(&stage, iters);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

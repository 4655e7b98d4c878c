//! Fuzzing (proptest) of what reads untrusted input: the job parser, the token verifier,
//! the HTML rewriter, the SMTP reply classifier, line-ending normalization and the config
//! loader. A bounded run is part of the suite (256 cases each); a longer one:
//!
//! ```sh
//! PROPTEST_CASES=200000 cargo test --release --test fuzz
//! ```
//!
//! Each property is what must hold for any input: no panic, and the security invariant of
//! the component (a forged token never verifies, a rewritten link always verifies and
//! points at http(s), a secret never appears in a config error, …). Inputs that broke a
//! property become the `regressions` cases below.

use std::collections::HashMap;

use paloma::config::Settings;
use paloma::job::Job;
use paloma::outcome::{enhanced_status, BounceClass, Outcome};
use paloma::render::crlf_line_endings;
use paloma::render::html::{rewrite, rewrite_and_text, to_text, LinkOwner};
use paloma::track::token::{Kind, Signer};
use proptest::prelude::*;

fn signer() -> Signer {
    Signer::new("1", "fuzz-secret-0123456789abcdef", &HashMap::new())
}

const MIN: &str = "[sender]\nfrom = \"Shop <news@shop.example>\"\nhelo = \"mta.shop.example\"\n[tracking]\nsecret = \"0123456789abcdef0123\"\n";

/// JSON-ish text built from the pieces a job is made of, so that most cases get past the
/// JSON parser and reach the validation.
fn jobish() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        "[a-z@.]{0,30}".prop_map(|s| format!("\"{s}\"")),
        "\\PC{0,40}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("{\"X-A\":\"b\\r\\nBcc: x@y\"}".to_string()),
        Just("{}".to_string()),
        (0i64..10).prop_map(|n| n.to_string()),
    ];
    let key = prop_oneof![
        Just("id"),
        Just("campaign"),
        Just("template"),
        Just("to"),
        Just("to_name"),
        Just("data"),
        Just("from"),
        Just("reply_to"),
        Just("headers"),
        Just("send_at"),
        Just("transactional"),
        Just("x"),
    ];
    proptest::collection::vec((key, value), 0..10).prop_map(|kv| {
        let body: Vec<String> = kv
            .into_iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        format!("{{{}}}", body.join(","))
    })
}

proptest! {
    // Cases: PROPTEST_CASES (default 256). Failures are reported with their input (and
    // then added to `regressions`), not persisted to files.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_job_parser_never_panics_and_what_it_accepts_is_clean(raw in prop_oneof![jobish(), "\\PC{0,200}", proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| String::from_utf8_lossy(&b).into_owned())]) {
        if let Ok(job) = Job::parse(raw.as_bytes(), 256 * 1024) {
            prop_assert!(!job.to.as_str().contains(['\r', '\n']));
            // A campaign goes into URLs, keys and headers as it is.
            prop_assert!(paloma::job::CampaignId::allowed(job.campaign.as_str()));
            for (name, value) in &job.headers {
                prop_assert!(!name.contains(['\r', '\n', ':']) && !value.contains(['\r', '\n']));
            }
        }
    }

    #[test]
    fn the_token_verifier_never_panics_on_anything(token in "\\PC{0,300}") {
        let _ = signer().verify(&token);
    }

    #[test]
    fn a_changed_token_never_verifies_as_anything_else(
        fields in proptest::collection::vec("[a-zA-Z0-9@._:/?=&-]{1,40}", 5),
        at in any::<prop::sample::Index>(),
        with in any::<u8>(),
    ) {
        let s = signer();
        let f: Vec<&str> = fields.iter().map(String::as_str).collect();
        let token = s.sign(Kind::Click, &f);
        let original = s.verify(&token).expect("own token verifies");
        let mut bytes = token.clone().into_bytes();
        let i = at.index(bytes.len());
        bytes[i] = with;
        if let Ok(changed) = String::from_utf8(bytes) {
            if changed != token {
                if let Ok(c) = s.verify(&changed) {
                    // Only a change the encoding ignores (unused trailing bits) may verify,
                    // and then to the very same claims.
                    prop_assert_eq!(c.url, original.url);
                    prop_assert_eq!(c.to, original.to);
                    prop_assert_eq!(c.id, original.id);
                }
            }
        }
        // A token from another key never verifies.
        let other = Signer::new("1", "another-secret-0123456789abc", &HashMap::new());
        prop_assert!(s.verify(&other.sign(Kind::Click, &f)).is_err());
    }

    #[test]
    fn rewritten_links_verify_and_point_at_http_and_one_pass_equals_two(
        html in prop_oneof![
            "\\PC{0,300}",
            proptest::collection::vec(prop_oneof![
                Just("<a href=\"https://shop.example/p?a=1&amp;b=2\">x</a>".to_string()),
                Just("<a data-paloma-link=\"pricing\" href='http://x.example/'>".to_string()),
                Just("<a href=\"javascript:alert(1)\">".to_string()),
                Just("<a href=\"mailto:a@b\">".to_string()),
                Just("<a data-paloma-notrack href=\"https://n.example\">".to_string()),
                Just("</body>".to_string()),
                Just("<".to_string()),
                Just("&amp;&#x20;&lt;&".to_string()),
                Just("<p>Größe H&M</p>".to_string()),
                Just("<a href=\"https://a.example/\u{1F}x\">".to_string()),
                "\\PC{0,20}",
            ], 0..12).prop_map(|v| v.concat()),
        ],
    ) {
        let s = signer();
        let who = LinkOwner { id: "j1", campaign: "c", to: "a@b.test", sent: "1700000000", variant: "", touch: "" };
        let base = "https://t.example";
        let mut out = String::new();
        rewrite(&html, base, &s, &who, &mut out);
        for (i, _) in out.match_indices("https://t.example/c/") {
            let rest = &out[i + "https://t.example/c/".len()..];
            let end = rest.find(|c: char| c == '"' || c == '\'' || c.is_whitespace() || c == '>').unwrap_or(rest.len());
            let claims = s.verify(&rest[..end]);
            prop_assert!(claims.is_ok(), "a rewritten link does not verify: {}", &rest[..end]);
            let url = claims.unwrap().url.to_ascii_lowercase();
            prop_assert!(url.starts_with("http://") || url.starts_with("https://"), "{}", url);
        }
        prop_assert!(out.contains("https://t.example/o/"), "no pixel");
        let mut one = String::new();
        let text = rewrite_and_text(&html, base, &s, &who, &mut one);
        prop_assert_eq!(&one, &out);
        prop_assert_eq!(text, to_text(&html));
    }

    #[test]
    fn smtp_replies_are_classified_without_panicking(code in 400u16..600, text in "\\PC{0,200}") {
        let reply = format!("{code} {text}");
        let e = enhanced_status(&reply);
        prop_assert!(e.is_empty() || e.split('.').count() == 3);
        let _ = BounceClass::classify(&e, &reply);
        if let Outcome::Bounced(b) = Outcome::bounce(code, reply.clone()) {
            prop_assert_eq!(b.response, reply);
        }
    }

    #[test]
    fn line_endings_are_always_crlf_after_normalization(bytes in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), any::<u8>()], 0..200)) {
        let fixed = crlf_line_endings(&bytes).unwrap_or_else(|| bytes.clone());
        for (i, &b) in fixed.iter().enumerate() {
            if b == b'\r' { prop_assert_eq!(fixed.get(i + 1), Some(&b'\n')); }
            if b == b'\n' { prop_assert!(i > 0 && fixed[i - 1] == b'\r'); }
        }
        prop_assert!(crlf_line_endings(&fixed).is_none(), "idempotent");
    }

    #[test]
    fn the_config_loader_never_panics(text in "\\PC{0,300}", extra in "[a-z_]{1,12} = \\PC{0,20}") {
        let _ = Settings::from_toml(&text, Vec::new());
        let _ = Settings::from_toml(&format!("{MIN}\n[delivery]\n{extra}\n"), Vec::new());
    }

    #[test]
    fn a_secret_never_appears_in_a_config_error(secret in "[A-Za-z0-9]{8,40}", bad in "[a-z]{1,8}") {
        let env = vec![
            ("PALOMA_DELIVERY__PASSWORD".to_string(), secret.clone()),
            ("PALOMA_DELIVERY__TIMEOUT".to_string(), bad),
        ];
        if let Err(e) = Settings::from_toml(MIN, env) {
            prop_assert!(!e.to_string().contains(&secret), "{}", e);
        }
        let text = format!("{MIN}[webhooks]\nsecret = {secret}\n");
        if let Err(e) = Settings::from_toml(&text, Vec::new()) {
            prop_assert!(!e.to_string().contains(&secret), "{}", e);
        }
    }
}

/// Inputs that once broke a property.
mod regressions {
    use super::*;

    #[test]
    fn multibyte_text_right_after_an_entity() {
        // decode_entities once panicked when the 12th byte after '&' fell inside a character.
        let _ = to_text("<p>H&M Größe Größe</p>");
    }
}

//! Fuzzing (proptest) of what reads untrusted input: the job parser, the token verifier,
//! the HTML rewriter, the SMTP reply classifier, line-ending normalization and the config
//! loader. A bounded run is part of the suite (256 cases each); a longer one:
//!
//! ```sh
//! PROPTEST_CASES=200000 cargo test --release --test it fuzz::
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

    /// The fuzzer's inputs are not all refusals: a job built from valid parts is accepted,
    /// with the parts it was built from.
    #[test]
    fn a_job_of_valid_parts_is_accepted_as_it_was_written(
        id in "[A-Za-z0-9:_-]{1,40}",
        campaign in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}",
        local in "[a-z0-9]([a-z0-9+_-]{0,20}[a-z0-9])?",
        domain in "[a-z0-9]{1,20}\\.(test|example|com)",
        name in "\\PC{0,30}",
        transactional in any::<bool>(),
    ) {
        let to = format!("{local}@{domain}");
        let raw = serde_json::json!({
            "id": id, "campaign": campaign, "template": "receipt", "to": to,
            "to_name": name, "data": {"name": name}, "transactional": transactional,
        })
        .to_string();
        let job = Job::parse(raw.as_bytes(), 256 * 1024);
        prop_assert!(job.is_ok(), "{raw}: {:?}", job.err().map(|(e, _)| e.to_string()));
        let job = job.unwrap();
        prop_assert_eq!(job.id.as_str(), id.as_str());
        prop_assert_eq!(job.campaign.as_str(), campaign.as_str());
        prop_assert_eq!(job.to.as_str(), to.as_str());
        prop_assert_eq!(job.template.as_str(), "receipt");
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
                    prop_assert_eq!(c, original);
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
        let who = LinkOwner { id: "j1", campaign: "c", to: "a@b.test", sent: "1700000000", variant: "", touch: "", transactional: false };
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

/// The bounce listener's untrusted input: its SMTP session (driven over an in-memory
/// stream, messages kept instead of recorded), where DATA ends, the DSN/ARF parser, and the
/// SendGrid and SES event parsers. Beyond no panic: replies are well-formed SMTP, DATA ends
/// only at CRLF.CRLF, a message never exceeds `max_message_bytes`, every recorded field is
/// within its documented size, and only a well-formed 5.x.x status makes a bounce permanent.
mod bounces {
    use std::sync::Mutex;
    use std::time::Duration;

    use paloma::bounces::fields::{self, Status};
    use paloma::bounces::record::Finding;
    use paloma::bounces::report::{self, Kind};
    use paloma::bounces::server::{
        converse, DataBudget, DataLines, DataPiece, Envelope, Intake, Rules,
    };
    use paloma::bounces::{providers, ses, ReturnPaths};
    use paloma::config::Settings;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const MAX_BYTES: usize = 4096;

    struct Keep(Mutex<Vec<Vec<u8>>>);

    impl Intake for Keep {
        async fn take(&self, raw: &[u8], _: &Envelope) -> bool {
            self.0.lock().unwrap().push(raw.to_vec());
            true
        }
    }

    fn rules() -> Rules {
        let s = Settings::from_toml(
            "[sender]\nfrom = \"a@shop.test\"\nhelo = \"h\"\n[tracking]\nsecret = \"fuzz-secret-0123456789abcdef\"\n[bounces]\ndomain = \"bounces.test\"\n",
            Vec::new(),
        )
        .unwrap();
        Rules {
            paths: ReturnPaths::new(&s).unwrap(),
            accept: vec!["fbl@bounces.test".into()],
            hostname: "h.test".into(),
            max_bytes: MAX_BYTES,
            timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(120),
        }
    }

    /// Runs one session on `input`: what the server wrote, and the messages it took.
    fn session(input: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, server) = tokio::io::duplex(8192);
            let (mut rd, mut wr) = tokio::io::split(client);
            let (rules, budget) = (rules(), DataBudget::new(1 << 20));
            let keep = Keep(Mutex::new(Vec::new()));
            let close = tokio::sync::Notify::new();
            let write = async {
                let _ = wr.write_all(input).await;
                let _ = wr.shutdown().await;
            };
            let read = async {
                let mut out = Vec::new();
                let _ = rd.read_to_end(&mut out).await;
                out
            };
            let serve = async {
                converse(server, &rules, &budget, &keep, &close).await;
            };
            let ((), out, ()) = tokio::join!(write, read, serve);
            (out, keep.0.into_inner().unwrap())
        })
    }

    fn smtpish() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"EHLO x\r\n".to_vec()),
            Just(b"MAIL FROM:<>\r\n".to_vec()),
            Just(b"MAIL FROM:<a@b.test> SIZE=99999999\r\n".to_vec()),
            Just(b"RCPT TO:<postmaster@bounces.test>\r\n".to_vec()),
            Just("RCPT TO:<€€x@bounces.test>\r\n".as_bytes().to_vec()),
            Just(b"RCPT TO:<b-00000000000000000000000000000000@bounces.test>\r\n".to_vec()),
            Just(b"RCPT TO:<x@elsewhere.test>\r\n".to_vec()),
            Just(b"DATA\r\n".to_vec()),
            Just(b"DATA\n".to_vec()),
            Just(b".\r\n".to_vec()),
            Just(b"\n.\n".to_vec()),
            Just(b"\r\n.\r\n".to_vec()),
            Just(b"..x\r\n".to_vec()),
            Just(b"RSET\r\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b"\n".to_vec()),
            "\\PC{0,30}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..64),
            (1usize..3).prop_map(|n| vec![b'z'; n * 3000]),
        ];
        proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
    }

    fn count(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    /// A DSN or a feedback report made of the fields the parser reads, with hostile values.
    fn reportish() -> impl Strategy<Value = Vec<u8>> {
        let name = prop_oneof![
            Just("Status"),
            Just("Action"),
            Just("Diagnostic-Code"),
            Just("Final-Recipient"),
            Just("Original-Recipient"),
            Just("Reporting-MTA"),
            Just("Feedback-Type"),
            Just("User-Agent"),
            Just("Original-Rcpt-To"),
            Just("X-Paloma-Id"),
            Just("Message-ID"),
        ];
        let value = prop_oneof![
            "\\PC{0,40}",
            Just("5.1.1€".to_string()),
            Just("failed".to_string()),
            Just("smtp; 550 5.1.1 user unknown".to_string()),
            "[0-9.-]{0,12}",
            (1usize..4).prop_map(|n| format!("rfc822; {}", "x".repeat(n * 2000))),
        ];
        let block = proptest::collection::vec((name, value), 0..8).prop_map(|f| {
            f.iter()
                .map(|(k, v)| format!("{k}: {v}\r\n"))
                .collect::<String>()
        });
        let kind = prop_oneof![
            Just("delivery-status"),
            Just("global-delivery-status"),
            Just("feedback-report"),
            Just("rfc822"),
        ];
        let from = prop_oneof![Just("MAILER-DAEMON@relay.test"), Just("a@b.test")];
        (kind, from, proptest::collection::vec(block, 0..4), "\\PC{0,100}").prop_map(
            |(kind, from, blocks, text)| {
                format!(
                    "From: {from}\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\n{text}\r\n--B\r\nContent-Type: message/{kind}\r\n\r\n{}\r\n--B--\r\n",
                    blocks.join("\r\n")
                )
                .into_bytes()
            },
        )
    }

    /// A finding as recorded: every field within its size, permanent only on a well-formed
    /// 5.x.x status.
    fn check(f: &Finding) -> Result<(), TestCaseError> {
        prop_assert!(f.diagnostic.len() <= fields::DIAGNOSTIC_MAX);
        prop_assert!(f.reporting_mta.len() <= fields::MTA_MAX);
        prop_assert!(f.feedback_type.len() <= fields::FEEDBACK_TYPE_MAX);
        prop_assert!(f.source.len() <= fields::SOURCE_MAX);
        prop_assert!(f
            .recipient
            .as_ref()
            .is_none_or(|r| r.len() <= fields::RECIPIENT_MAX));
        let status = Status::parse(&f.status);
        prop_assert!(
            f.status.is_empty() || f.status == fields::MALFORMED || status.is_some(),
            "{}",
            f.status
        );
        if f.permanent {
            prop_assert!(status.is_some_and(|s| s.is_permanent()), "{}", f.status);
        }
        Ok(())
    }

    fn string_or_junk() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            "\\PC{0,30}".prop_map(serde_json::Value::from),
            Just(serde_json::Value::from("5.1.1€")),
            Just(serde_json::Value::from("-5.-1.-1")),
            Just(serde_json::Value::from("99999999999999999999.1.1")),
            Just(serde_json::Value::from("5.1.1")),
            Just(serde_json::Value::from("x".repeat(5000))),
            Just(serde_json::Value::Null),
            any::<i64>().prop_map(serde_json::Value::from),
        ]
    }

    /// The inputs of issue 22 that broke the session, as fixed cases.
    #[test]
    fn a_multibyte_recipient_and_a_bare_lf_dot_in_one_session() {
        let input = "EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<€€x@bounces.test>\r\nDATA\r\nhi\n.\nRSET\r\n.\r\nQUIT\r\n";
        let (out, taken) = session(input.as_bytes());
        let out = String::from_utf8(out).unwrap();
        let codes: Vec<&str> = out.lines().filter_map(|l| l.get(..4)).collect();
        assert_eq!(
            codes,
            ["220 ", "250-", "250-", "250-", "250 ", "250 ", "250 ", "354 ", "250 ", "221 "],
            "{out}"
        );
        assert_eq!(taken, [b"hi\n.\nRSET\r\n".to_vec()]);
    }

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn the_bounce_session_answers_in_smtp_and_never_ends_data_at_a_bare_lf(input in prop_oneof![smtpish(), proptest::collection::vec(any::<u8>(), 0..300)]) {
            let (out, taken) = session(&input);
            let out = String::from_utf8(out).expect("replies are text");
            prop_assert!(out.is_empty() || out.ends_with("\r\n"), "{:?}", out);
            for line in out.split_terminator("\r\n") {
                let b = line.as_bytes();
                prop_assert!(b.len() >= 4 && b[..3].iter().all(u8::is_ascii_digit) && (b[3] == b' ' || b[3] == b'-'), "{:?}", line);
            }
            // Each message taken ended at a "." CRLF after a line's LF (a bare "\n.\n" never ends one).
            prop_assert!(taken.len() <= count(&input, b"\n.\r\n"), "{} taken from {:?}", taken.len(), String::from_utf8_lossy(&input));
            for m in &taken {
                prop_assert!(m.len() <= MAX_BYTES);
            }
        }

        #[test]
        fn data_ends_exactly_at_crlf_dot_crlf(pieces in proptest::collection::vec(prop_oneof![
            Just(b".\r\n".to_vec()), Just(b".\n".to_vec()), Just(b"\r\n".to_vec()), Just(b"\n".to_vec()),
            Just(b"\r".to_vec()), Just(b"a\r".to_vec()), Just(b"..\r\n".to_vec()), Just(b"x\n".to_vec()),
            proptest::collection::vec(prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), any::<u8>()], 0..6),
        ], 0..30)) {
            let mut d = DataLines::default();
            let mut stream = b"\r\n".to_vec();
            for p in &pieces {
                let end = d.piece(p) == DataPiece::End;
                prop_assert_eq!(end, stream.ends_with(b"\r\n") && p == b".\r\n", "{:?} after {:?}", p, stream);
                if end {
                    break;
                }
                stream.extend_from_slice(p);
            }
        }

        #[test]
        fn the_dsn_and_arf_parser_bounds_every_field(raw in prop_oneof![reportish(), proptest::collection::vec(any::<u8>(), 0..400)], null in any::<bool>()) {
            let r = report::parse(&raw, null);
            match r.kind {
                Kind::Dsn { reporting_mta, recipients } => {
                    prop_assert!(reporting_mta.len() <= fields::MTA_MAX);
                    prop_assert!(recipients.len() <= fields::DSN_RECIPIENTS_MAX);
                    for d in recipients {
                        prop_assert!(d.diagnostic.len() <= fields::DIAGNOSTIC_MAX);
                        prop_assert!(d.recipient.len() <= fields::RECIPIENT_MAX + 2);
                        let f = Finding::returned(d.status.clone(), d.diagnostic, reporting_mta.clone(), d.action == "delayed", d.status.starts_with('5'), Some(d.recipient));
                        check(&f)?;
                    }
                }
                Kind::Feedback { feedback_type, source, recipient } => {
                    check(&Finding::complained(feedback_type, source, recipient))?;
                }
                Kind::TextBounce { status, diagnostic, permanent } => {
                    prop_assert!(diagnostic.len() <= fields::DIAGNOSTIC_MAX);
                    prop_assert!(Status::parse(&status).is_some(), "{}", status);
                    check(&Finding::returned(status, diagnostic, String::new(), false, permanent, None))?;
                }
                Kind::AutoReply | Kind::Other => {}
            }
        }

        #[test]
        fn sendgrid_events_are_bounded_and_strict(events in proptest::collection::vec(proptest::collection::vec((prop_oneof![
            Just("email"), Just("event"), Just("paloma_id"), Just("paloma_campaign"), Just("reason"),
            Just("status"), Just("type"), Just("sg_event_id"), Just("paloma_variant"), Just("paloma_touch"),
        ], prop_oneof![string_or_junk(), prop_oneof![Just("bounce"), Just("dropped"), Just("spamreport"), Just("blocked")].prop_map(serde_json::Value::from)]), 0..10), 0..5), junk in "\\PC{0,100}") {
            let body: Vec<serde_json::Value> = events.into_iter().map(|kv| serde_json::Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())).collect();
            let body = serde_json::to_vec(&body).unwrap();
            for item in providers::sendgrid_events(&body).unwrap_or_default() {
                check(&item.finding)?;
            }
            let _ = providers::sendgrid_events(junk.as_bytes());
        }

        #[test]
        fn ses_notifications_are_bounded_and_strict(
            kind in prop_oneof![Just("Bounce".to_string()), Just("Complaint".to_string()), "\\PC{0,8}"],
            bounce_type in prop_oneof![Just("Permanent".to_string()), Just("Transient".to_string()), "\\PC{0,8}"],
            headers in proptest::collection::vec((prop_oneof![Just("X-Paloma-Id"), Just("X-Paloma-Campaign"), Just("X-Paloma-Variant"), Just("X-Paloma-Touch")], string_or_junk()), 0..5),
            recipients in proptest::collection::vec(proptest::collection::vec((prop_oneof![Just("emailAddress"), Just("status"), Just("diagnosticCode")], string_or_junk()), 0..4), 0..4),
            mta in string_or_junk(),
            junk in "\\PC{0,100}",
        ) {
            let headers: Vec<serde_json::Value> = headers.into_iter().map(|(n, v)| serde_json::json!({"name": n, "value": v})).collect();
            let recipients: Vec<serde_json::Value> = recipients.into_iter().map(|kv| serde_json::Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())).collect();
            let inner = serde_json::json!({
                "notificationType": kind,
                "mail": {"headers": headers},
                "bounce": {"bounceType": bounce_type, "reportingMTA": mta.clone(), "bouncedRecipients": recipients.clone()},
                "complaint": {"complainedRecipients": recipients, "complaintFeedbackType": mta.clone(), "userAgent": mta},
            });
            for message in [inner.to_string(), junk] {
                let m: ses::SnsMessage = serde_json::from_value(serde_json::json!({
                    "Type": "Notification", "MessageId": "m", "TopicArn": "t", "Message": message,
                    "Timestamp": "", "SignatureVersion": "2", "Signature": "", "SigningCertURL": "",
                })).unwrap();
                for item in ses::ses_events(&m) {
                    check(&item.finding)?;
                }
            }
        }
    }
}

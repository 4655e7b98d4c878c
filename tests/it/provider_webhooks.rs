//! SendGrid's Event Webhook: signed as SendGrid documents it (ECDSA P-256 over timestamp and
//! body), with a test key made by openssl. A bounce and a spam report for jobs paloma sent
//! through the relay are recorded against those jobs; unsigned, forged, tampered and stale
//! requests are refused and change nothing.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::track::request;
use common::*;

struct Key {
    dir: tempfile::TempDir,
    public: String,
}

impl Key {
    fn new() -> Key {
        require_tools();
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("k.pem");
        assert!(Command::new("openssl")
            .args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out"
            ])
            .arg(&pem)
            .status()
            .unwrap()
            .success());
        let der = Command::new("openssl")
            .args(["ec", "-pubout", "-outform", "DER", "-in"])
            .arg(&pem)
            .output()
            .unwrap();
        assert!(der.status.success());
        use base64::Engine as _;
        let public = base64::engine::general_purpose::STANDARD.encode(&der.stdout);
        Key { dir, public }
    }

    /// base64 of the DER ECDSA signature of `timestamp || body`.
    fn sign(&self, timestamp: &str, body: &[u8]) -> String {
        let data = self.dir.path().join("data");
        let mut signed = timestamp.as_bytes().to_vec();
        signed.extend_from_slice(body);
        std::fs::write(&data, signed).unwrap();
        let out = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(self.dir.path().join("k.pem"))
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success());
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&out.stdout)
    }
}

fn post(port: u16, body: &[u8], sig: Option<&str>, ts: &str) -> u16 {
    let mut h = vec![("Content-Type", "application/json")];
    if let Some(s) = sig {
        h.push(("X-Twilio-Email-Event-Webhook-Signature", s));
    }
    h.push(("X-Twilio-Email-Event-Webhook-Timestamp", ts));
    request(port, "POST", "/webhooks/sendgrid", &h, body).status
}

#[test]
fn signed_sendgrid_events_are_recorded_and_unsigned_ones_refused() {
    let key = Key::new();
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let track_port = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            "listen = \"127.0.0.1:{track_port}\"\n[providers]\nsendgrid_public_key = \"{}\"\n",
            key.public
        ),
    );
    let daemon = Daemon::spawn(&setup.config);
    let mut conn = redis.conn();
    enqueue_raw(&mut conn, &setup.prefix, &jobs(2, "sg", "example.test"));
    wait_terminal(
        &mut conn,
        &setup.prefix,
        2,
        Duration::from_secs(30),
        Some(&daemon),
    );
    // Each message names its job for SendGrid's events.
    let dumps = sink.dumps();
    let m = String::from_utf8_lossy(&dumps[0]).into_owned();
    assert!(
        m.contains("X-SMTPAPI: {\"unique_args\":{\"paloma_campaign\":\"sg\",\"paloma_id\":\"sg-"),
        "{m}"
    );
    // And its touch bucket (each recipient's first marketing message).
    assert!(m.contains(",\"paloma_touch\":\"1\"}}"), "{m}");
    wait_port("127.0.0.1", track_port, Duration::from_secs(10));

    // SendGrid's documented example events, for the jobs just sent (with the unique args
    // paloma set; the spam report's touch is one paloma could not have written).
    let body = br#"[{"email":"u0@example.test","timestamp":1513299569,"event":"bounce","sg_event_id":"6g4ZI7SA-xmRDv57GoPIPw==","sg_message_id":"14c5d75ce93.dfd.64b469.filter0001","reason":"550 5.1.1 The email account that you tried to reach does not exist","status":"5.1.1","type":"bounce","paloma_id":"sg-0","paloma_campaign":"sg","paloma_touch":"1"},{"email":"u1@example.test","timestamp":1513299569,"event":"spamreport","sg_event_id":"37nvH5QBz858KGVYCM4uOA==","sg_message_id":"14c5d75ce93.dfd.64b469.filter0002","paloma_id":"sg-1","paloma_campaign":"sg","paloma_touch":"1:x"}]"#;
    let now = chrono_now().to_string();
    let sig = key.sign(&now, body);
    // Unsigned, forged (another body), stale: refused, nothing recorded.
    assert_eq!(post(track_port, body, None, &now), 401);
    let mut tampered = body.to_vec();
    tampered[20] ^= 1;
    assert_eq!(post(track_port, &tampered, Some(&sig), &now), 401);
    let old = (chrono_now() - 3600).to_string();
    assert_eq!(
        post(track_port, body, Some(&key.sign(&old, body)), &old),
        401
    );
    assert!(events(&mut conn, &setup.prefix)
        .iter()
        .all(|e| e["type"] != "returned" && e["type"] != "complained"));
    // Signed: recorded; the same request again (SendGrid retries): recorded once.
    assert_eq!(post(track_port, body, Some(&sig), &now), 200);
    assert_eq!(post(track_port, body, Some(&sig), &now), 200);
    let evs = events(&mut conn, &setup.prefix);
    let returned: Vec<_> = evs.iter().filter(|e| e["type"] == "returned").collect();
    let complained: Vec<_> = evs.iter().filter(|e| e["type"] == "complained").collect();
    assert_eq!(returned.len(), 1, "{returned:?}");
    assert_eq!(complained.len(), 1, "{complained:?}");
    assert_eq!(returned[0]["id"], "sg-0");
    assert_eq!(returned[0]["class"], "invalid_recipient");
    assert_eq!(returned[0]["permanent"], true);
    assert_eq!(complained[0]["id"], "sg-1");
    assert_eq!(complained[0]["source"], "sendgrid");
    let reason = |a: &str, conn: &mut redis::Connection| -> Option<String> {
        redis::cmd("HGET")
            .arg(format!("{}suppressed", setup.prefix))
            .arg(a)
            .query(conn)
            .unwrap()
    };
    assert_eq!(
        reason("u0@example.test", &mut conn).as_deref(),
        Some("bounced")
    );
    assert_eq!(
        reason("u1@example.test", &mut conn).as_deref(),
        Some("complained")
    );
    // The bounce is counted in its touch bucket; the unknown bucket is not a field.
    let touches: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("{}touches:sg", setup.prefix))
        .query(&mut conn)
        .unwrap();
    assert_eq!(touches.get("1:returned"), Some(&1), "{touches:?}");
    assert_eq!(touches.get("1:delivered"), Some(&2), "{touches:?}");
    assert!(touches.keys().all(|k| !k.starts_with("1:x")), "{touches:?}");
    // Not JSON, but signed: 400.
    let junk = b"not json";
    assert_eq!(
        post(track_port, junk, Some(&key.sign(&now, junk)), &now),
        400
    );
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The string SNS signs, written here from AWS's documentation (independently of paloma's).
fn sns_string(fields: &[(&str, &str)]) -> String {
    fields.iter().map(|(k, v)| format!("{k}\n{v}\n")).collect()
}

fn openssl_sign(key: &std::path::Path, data: &str, dir: &std::path::Path) -> String {
    let f = dir.join("tosign");
    std::fs::write(&f, data).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .arg(&f)
        .output()
        .unwrap();
    assert!(out.status.success());
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(&out.stdout)
}

/// Python's own static HTTP server, serving the signing certificate (as SNS's host would)
/// and answering the subscription confirmation; its request log shows what was fetched.
struct CertServer {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
}

impl CertServer {
    fn start(dir: &std::path::Path) -> CertServer {
        let port = free_port();
        let log = dir.join("http.log");
        let child = Command::new("/usr/bin/python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_port("127.0.0.1", port, Duration::from_secs(10));
        CertServer { child, port, log }
    }
}

impl Drop for CertServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn ses_notifications_through_sns_are_verified_by_the_signing_certificate() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("sns.key");
    assert!(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=sns.test",
            "-keyout"
        ])
        .arg(&key)
        .arg("-out")
        .arg(dir.path().join("SimpleNotificationService-test.pem"))
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success());
    std::fs::write(dir.path().join("confirm"), "<ConfirmSubscriptionResponse/>").unwrap();
    let certs = CertServer::start(dir.path());
    let topic = "arn:aws:sns:us-east-1:123456789012:ses-bounces";
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let track_port = free_port();
    let setup = Setup::new(
        &redis.url(),
        sink.port,
        "",
        "",
        &format!(
            "listen = \"127.0.0.1:{track_port}\"\n[providers]\nses_topics = [\"{topic}\"]\nsns_cert_prefix = \"http://127.0.0.1:{}/\"\n",
            certs.port
        ),
    );
    let daemon = Daemon::spawn(&setup.config);
    let mut conn = redis.conn();
    enqueue_raw(&mut conn, &setup.prefix, &jobs(2, "ses", "example.test"));
    wait_terminal(
        &mut conn,
        &setup.prefix,
        2,
        Duration::from_secs(30),
        Some(&daemon),
    );
    wait_port("127.0.0.1", track_port, Duration::from_secs(10));
    let cert_url = format!(
        "http://127.0.0.1:{}/SimpleNotificationService-test.pem",
        certs.port
    );
    let post = |body: &str| {
        request(
            track_port,
            "POST",
            "/webhooks/ses",
            &[
                ("Content-Type", "text/plain; charset=UTF-8"),
                ("x-amz-sns-message-type", "Notification"),
            ],
            body.as_bytes(),
        )
        .status
    };
    let notification = |message: &str, topic: &str, cert_url: &str, sign_with_topic: &str| {
        let (id, ts) = (
            "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
            "2026-12-01T12:00:00.000Z",
        );
        let sig = openssl_sign(
            &key,
            &sns_string(&[
                ("Message", message),
                ("MessageId", id),
                ("Timestamp", ts),
                ("TopicArn", sign_with_topic),
                ("Type", "Notification"),
            ]),
            dir.path(),
        );
        serde_json::json!({
            "Type": "Notification", "MessageId": id, "TopicArn": topic, "Message": message,
            "Timestamp": ts, "SignatureVersion": "2", "Signature": sig,
            "SigningCertURL": cert_url,
            "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
        })
        .to_string()
    };
    // SES's documented bounce notification (with original headers), for ses-0.
    let bounce = serde_json::json!({
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": "Permanent", "bounceSubType": "General",
            "bouncedRecipients": [{"emailAddress": "u0@example.test", "action": "failed",
                "status": "5.1.1", "diagnosticCode": "smtp; 550 5.1.1 user unknown"}],
            "timestamp": "2026-12-01T12:00:00.000Z", "feedbackId": "0000013786031775-163e3910-53eb-4c8e-a04a-f29debf88a84-000000",
            "reportingMTA": "dsn; a8-70.smtp-out.amazonses.com"
        },
        "mail": {
            "timestamp": "2026-12-01T11:59:59.000Z", "source": "news@shop.test",
            "messageId": "0000013786031775-fea503bc-7497-49e1-881b-a0379bb037d3-000000",
            "destination": ["u0@example.test"], "headersTruncated": false,
            "headers": [{"name": "X-Paloma-Id", "value": "ses-0"}, {"name": "X-Paloma-Campaign", "value": "ses"},
                {"name": "X-Paloma-Touch", "value": "1"}]
        }
    })
    .to_string();
    let complaint = serde_json::json!({
        "notificationType": "Complaint",
        "complaint": {"userAgent": "AnyCompany Feedback Loop (V0.01)", "complainedRecipients": [{"emailAddress": "u1@example.test"}],
            "complaintFeedbackType": "abuse", "timestamp": "2026-12-01T12:00:00.000Z", "feedbackId": "f"},
        "mail": {"headers": [{"name": "X-Paloma-Id", "value": "ses-1"}, {"name": "X-Paloma-Campaign", "value": "ses"}]}
    })
    .to_string();
    // Refused: another topic, a certificate from elsewhere, a tampered message.
    let other = "arn:aws:sns:us-east-1:123456789012:not-ours";
    assert_eq!(post(&notification(&bounce, other, &cert_url, other)), 401);
    assert_eq!(
        post(&notification(
            &bounce,
            topic,
            "https://evil.test/SimpleNotificationService-x.pem",
            topic
        )),
        401
    );
    let tampered = notification(&bounce, topic, &cert_url, topic)
        .replace("u0@example.test", "u9@example.test");
    assert_eq!(post(&tampered), 401);
    assert!(events(&mut conn, &setup.prefix)
        .iter()
        .all(|e| e["type"] != "returned"));
    // Signed: recorded (once, however often SNS retries).
    assert_eq!(post(&notification(&bounce, topic, &cert_url, topic)), 200);
    assert_eq!(post(&notification(&bounce, topic, &cert_url, topic)), 200);
    let c = notification(&complaint, topic, &cert_url, topic).replace("22b80b92", "33c80b92");
    // (a different MessageId changes the signed string: sign that one properly)
    assert_eq!(post(&c), 401, "a changed MessageId breaks the signature");
    let complaint_body = {
        let (id, ts) = (
            "33c80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
            "2026-12-01T12:00:01.000Z",
        );
        let sig = openssl_sign(
            &key,
            &sns_string(&[
                ("Message", &complaint),
                ("MessageId", id),
                ("Timestamp", ts),
                ("TopicArn", topic),
                ("Type", "Notification"),
            ]),
            dir.path(),
        );
        serde_json::json!({"Type": "Notification", "MessageId": id, "TopicArn": topic, "Message": complaint,
            "Timestamp": ts, "SignatureVersion": "2", "Signature": sig, "SigningCertURL": cert_url}).to_string()
    };
    assert_eq!(post(&complaint_body), 200);
    let evs = events(&mut conn, &setup.prefix);
    let returned: Vec<_> = evs.iter().filter(|e| e["type"] == "returned").collect();
    assert_eq!(returned.len(), 1, "{returned:?}");
    assert_eq!(returned[0]["id"], "ses-0");
    assert_eq!(returned[0]["status"], "5.1.1");
    assert_eq!(returned[0]["class"], "invalid_recipient");
    assert_eq!(returned[0]["reporting_mta"], "a8-70.smtp-out.amazonses.com");
    let complained: Vec<_> = evs.iter().filter(|e| e["type"] == "complained").collect();
    assert_eq!(complained.len(), 1);
    assert_eq!(complained[0]["id"], "ses-1");
    assert_eq!(complained[0]["source"], "AnyCompany Feedback Loop (V0.01)");
    // Each message carried its touch bucket for SES to return; the bounce is counted in it.
    let m = String::from_utf8_lossy(&sink.dumps()[0]).into_owned();
    assert!(
        m.lines().any(|l| l.trim_end() == "X-Paloma-Touch: 1"),
        "{m}"
    );
    let touches: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("{}touches:ses", setup.prefix))
        .query(&mut conn)
        .unwrap();
    assert_eq!(touches.get("1:returned"), Some(&1), "{touches:?}");
    // A subscription confirmation: verified, then confirmed at its SubscribeURL.
    let subscribe = format!(
        "http://127.0.0.1:{}/confirm?Action=ConfirmSubscription&Token=tok",
        certs.port
    );
    let (id, ts, msg) = (
        "44d8",
        "2026-12-01T12:00:02.000Z",
        "You have chosen to subscribe to the topic.",
    );
    let sig = openssl_sign(
        &key,
        &sns_string(&[
            ("Message", msg),
            ("MessageId", id),
            ("SubscribeURL", &subscribe),
            ("Timestamp", ts),
            ("Token", "tok"),
            ("TopicArn", topic),
            ("Type", "SubscriptionConfirmation"),
        ]),
        dir.path(),
    );
    let body = serde_json::json!({"Type": "SubscriptionConfirmation", "MessageId": id, "Token": "tok", "TopicArn": topic,
        "Message": msg, "SubscribeURL": subscribe, "Timestamp": ts, "SignatureVersion": "2", "Signature": sig,
        "SigningCertURL": cert_url}).to_string();
    assert_eq!(post(&body), 200);
    let log = std::fs::read_to_string(&certs.log).unwrap();
    assert!(
        log.contains("GET /confirm?Action=ConfirmSubscription"),
        "{log}"
    );
    assert_eq!(
        log.matches("GET /SimpleNotificationService-test.pem")
            .count(),
        1,
        "the certificate is fetched once and cached:\n{log}"
    );
}

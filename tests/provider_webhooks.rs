//! SendGrid's Event Webhook: signed as SendGrid documents it (ECDSA P-256 over timestamp and
//! body), with a test key made by openssl. A bounce and a spam report for jobs paloma sent
//! through the relay are recorded against those jobs; unsigned, forged, tampered and stale
//! requests are refused and change nothing.

mod common;

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
        ensure_tools();
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
    wait_port("127.0.0.1", track_port, Duration::from_secs(10));

    // SendGrid's documented example events, for the jobs just sent.
    let body = br#"[{"email":"u0@example.test","timestamp":1513299569,"event":"bounce","sg_event_id":"6g4ZI7SA-xmRDv57GoPIPw==","sg_message_id":"14c5d75ce93.dfd.64b469.filter0001","reason":"550 5.1.1 The email account that you tried to reach does not exist","status":"5.1.1","type":"bounce","paloma_id":"sg-0","paloma_campaign":"sg"},{"email":"u1@example.test","timestamp":1513299569,"event":"spamreport","sg_event_id":"37nvH5QBz858KGVYCM4uOA==","sg_message_id":"14c5d75ce93.dfd.64b469.filter0002","paloma_id":"sg-1","paloma_campaign":"sg"}]"#;
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

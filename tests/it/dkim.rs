//! DKIM: messages from three sender domains, an RSA-2048 key as PKCS#8, the same key as
//! PKCS#1 ("RSA PRIVATE KEY") and an Ed25519 key, are signed on the way out; mail-auth's verifier, resolving the public keys from a real
//! dnsmasq, passes them, and fails a message altered after signing.

use crate::common;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use common::*;
use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
use serde_json::json;

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A dnsmasq TXT record option, split into 250-byte strings. On dnsmasq's command line
/// (no shell in between) quotes would be kept literally; strings are separated by commas.
fn txt(name: &str, value: &str) -> String {
    let chunks: Vec<String> = value
        .as_bytes()
        .chunks(250)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!("txt-record={name},{}", chunks.join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_and_ed25519_signatures_verify_against_published_keys() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let keys = tempfile::tempdir().unwrap();
    let rsa = keys.path().join("rsa.pem");
    let ed = keys.path().join("ed.pem");
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        rsa.to_str().unwrap(),
    ]);
    openssl(&[
        "genpkey",
        "-algorithm",
        "ed25519",
        "-out",
        ed.to_str().unwrap(),
    ]);
    let rsa_pub = openssl(&[
        "pkey",
        "-in",
        rsa.to_str().unwrap(),
        "-pubout",
        "-outform",
        "DER",
    ]);
    let rsa1 = keys.path().join("rsa1.pem");
    openssl(&[
        "rsa",
        "-in",
        rsa.to_str().unwrap(),
        "-traditional",
        "-out",
        rsa1.to_str().unwrap(),
    ]);
    assert!(std::fs::read_to_string(&rsa1)
        .unwrap()
        .starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    let ed_pub = openssl(&[
        "pkey",
        "-in",
        ed.to_str().unwrap(),
        "-pubout",
        "-outform",
        "DER",
    ]);
    let ed_raw = &ed_pub[ed_pub.len() - 32..];
    let dns = Dns::start(&[
        txt(
            "s1._domainkey.shop.test",
            &format!("v=DKIM1; k=rsa; p={}", b64(&rsa_pub)),
        ),
        txt(
            "p1._domainkey.old.test",
            &format!("v=DKIM1; k=rsa; p={}", b64(&rsa_pub)),
        ),
        txt(
            "e1._domainkey.news.test",
            &format!("v=DKIM1; k=ed25519; p={}", b64(ed_raw)),
        ),
    ]);
    let extra = format!(
        "[[dkim]]\ndomain = \"shop.test\"\nselector = \"s1\"\nkey = \"{}\"\n[[dkim]]\ndomain = \"news.test\"\nselector = \"e1\"\nkey = \"{}\"\n[[dkim]]\ndomain = \"old.test\"\nselector = \"p1\"\nkey = \"{}\"\n",
        rsa.display(),
        ed.display(),
        rsa1.display()
    );
    let setup = Setup::new(&redis.url(), sink.port, "", "", &extra);
    let mut conn = redis.conn();
    let mut jobs = Vec::new();
    for i in 0..6 {
        let mut j = json!({"id": format!("d{i}"), "campaign": "dk", "template": "newsletter", "to": format!("r{i}@dest.test"),
            "data": {"first_name": "Ünïcode", "products": [{"name": "A", "price": "1", "url": "https://a.test/"}]}});
        match i % 3 {
            1 => j["from"] = json!("News Desk <hello@news.test>"),
            2 => j["from"] = json!("Old Desk <hello@old.test>"),
            _ => {}
        }
        jobs.push(j.to_string());
    }
    enqueue_raw(&mut conn, &setup.prefix, &jobs);
    let daemon = Daemon::spawn(&setup.config);
    wait_terminal(
        &mut conn,
        &setup.prefix,
        6,
        Duration::from_secs(60),
        Some(&daemon),
    );
    sink.wait_count(6, Duration::from_secs(10));

    let mut ns = NameServerConfig::udp_and_tcp(IpAddr::V4(Ipv4Addr::LOCALHOST));
    for c in &mut ns.connections {
        c.port = dns.port;
    }
    let auth = MessageAuthenticator::new(
        ResolverConfig::from_name_servers(vec![ns]),
        ResolverOpts::default(),
    )
    .unwrap();
    let dumps = sink.dumps();
    assert_eq!(dumps.len(), 6);
    let (mut rsa_pass, mut rsa1_pass, mut ed_pass) = (0, 0, 0);
    for raw in &dumps {
        let msg = AuthenticatedMessage::parse(raw).expect("parse");
        let out = auth.verify_dkim(&msg).await;
        assert_eq!(out.len(), 1, "one signature");
        assert_eq!(
            out[0].result(),
            &DkimResult::Pass,
            "signature verifies: {:?}",
            out[0].result()
        );
        let text = String::from_utf8_lossy(raw);
        let sig = text
            .lines()
            .find(|l| l.starts_with("DKIM-Signature:"))
            .unwrap();
        let sig_block: String = text[text.find("DKIM-Signature:").unwrap()..]
            .lines()
            .take(8)
            .collect();
        for h in [
            "from",
            "to",
            "subject",
            "date",
            "message-id",
            "list-unsubscribe",
            "list-unsubscribe-post",
        ] {
            assert!(
                sig_block.to_ascii_lowercase().contains(h),
                "{h} is signed: {sig_block}"
            );
        }
        if sig.contains("a=rsa-sha256") {
            if sig_block.contains("d=old.test") {
                rsa1_pass += 1;
            } else {
                assert!(sig_block.contains("d=shop.test"), "{sig_block}");
                rsa_pass += 1;
            }
        } else {
            assert!(sig.contains("a=ed25519-sha256"), "{sig}");
            assert!(sig_block.contains("d=news.test"));
            ed_pass += 1;
        }

        // Altering a signed header after signing breaks the signature.
        let tampered = text.replacen("Subject: ", "Subject: Re: ", 1);
        let msg = AuthenticatedMessage::parse(tampered.as_bytes()).unwrap();
        let out = auth.verify_dkim(&msg).await;
        assert!(
            matches!(out[0].result(), DkimResult::Fail(_)),
            "tampered message must fail: {:?}",
            out[0].result()
        );
    }
    assert_eq!((rsa_pass, ed_pass, rsa1_pass), (2, 2, 2));
}

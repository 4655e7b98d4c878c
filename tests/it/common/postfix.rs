//! A throwaway Postfix (the real MTA, so its bounce daemon writes real DSNs): relays
//! everything to `relayhost`, and mail for the domains in `transports` to the given
//! `host:port` (paloma's bounce listener). Stopped, queue and all, when dropped.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{free_port, wait_port};

pub struct Postfix {
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Postfix {
    /// `extra`: more main.cf lines (delay_warning_time, backoff times…).
    pub fn start(relayhost: u16, transports: &[(&str, u16)], extra: &str) -> Postfix {
        super::require_tools();
        let dir = tempfile::Builder::new()
            .prefix("paloma-postfix")
            .tempdir()
            .unwrap();
        let d = dir.path();
        for sub in ["etc", "spool", "data"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        // Postfix's daemons run as the postfix user: they must reach the queue and own data/.
        let _ = Command::new("chmod").arg("755").arg(d).status();
        let _ = Command::new("chown")
            .arg("postfix")
            .arg(d.join("data"))
            .status();
        let port = free_port();
        let transport: Vec<String> = transports
            .iter()
            .map(|(domain, p)| format!("{domain}=smtp:[127.0.0.1]:{p}"))
            .collect();
        let main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {q}\n\
             data_directory = {data}\n\
             mail_owner = postfix\n\
             setgid_group = postdrop\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             myhostname = relay.postfix.test\n\
             mydestination =\n\
             local_recipient_maps =\n\
             relayhost = [127.0.0.1]:{relayhost}\n\
             {transport}\n\
             mynetworks = 127.0.0.0/8\n\
             smtpd_relay_restrictions = permit_mynetworks, reject\n\
             smtp_tls_security_level = none\n\
             smtpd_tls_security_level = none\n\
             smtp_dns_support_level = disabled\n\
             maillog_file_prefixes = {dir}\n\
             maillog_file = {dir}/maillog\n\
             biff = no\n\
             {extra}\n",
            q = d.join("spool").display(),
            data = d.join("data").display(),
            dir = d.display(),
            transport = if transport.is_empty() {
                String::new()
            } else {
                format!("transport_maps = inline:{{ {} }}", transport.join(", "))
            },
        );
        std::fs::write(d.join("etc/main.cf"), main_cf).unwrap();
        // The packaged master.cf, with smtpd on our port and nothing chrooted.
        let master = std::fs::read_to_string("/etc/postfix/master.cf").expect("postfix installed");
        let master: String = master
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() >= 8 && !l.starts_with('#') && !l.starts_with(' ') {
                    let service = if f[0] == "smtp" && f[1] == "inet" {
                        format!("127.0.0.1:{port}")
                    } else {
                        f[0].to_string()
                    };
                    let chroot = if f[4] == "y" { "n" } else { f[4] };
                    let cmd = f[7..].join(" ");
                    format!(
                        "{service} {} {} {} {chroot} {} {} {cmd}\n",
                        f[1], f[2], f[3], f[5], f[6]
                    )
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(d.join("etc/master.cf"), master).unwrap();
        let st = Command::new("/usr/sbin/postfix")
            .args(["-c", d.join("etc").to_str().unwrap(), "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("postfix");
        assert!(
            st.success(),
            "postfix did not start (see {}/maillog)",
            d.display()
        );
        wait_port("127.0.0.1", port, Duration::from_secs(10));
        Postfix { dir, port }
    }

    /// Whether Postfix's queue holds nothing (every message relayed or bounced).
    pub fn queue_empty(&self) -> bool {
        Command::new("/usr/sbin/postqueue")
            .args(["-c", self.dir.path().join("etc").to_str().unwrap(), "-p"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("is empty"))
            .unwrap_or(false)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("/usr/sbin/postfix")
            .args(["-c", self.dir.path().join("etc").to_str().unwrap(), "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

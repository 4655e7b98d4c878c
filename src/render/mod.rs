//! Rendering: template registry → personalized subject/HTML/text → tracked links and open
//! pixel → MIME (mail-builder) → DKIM (mail-auth). The output is the exact bytes handed to
//! SMTP.
//!
//! Templates are compiled once at start. Per message the job's data becomes the Handlebars
//! context once (no re-serialization per part), and the MIME bytes go into a buffer the
//! caller reuses.

pub mod dkim;
pub mod html;

use std::collections::HashMap;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use handlebars::{Context, Handlebars};
use mail_builder::headers::address::Address;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::url::URL;
use mail_builder::MessageBuilder;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::Settings;
use crate::job::{Job, JobError, Mailbox};
use crate::track::token::{Kind, Signer};

pub use dkim::DkimKeys;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("templates dir {0}: {1}")]
    Dir(String, std::io::Error),
    #[error("template {name}/{part}: {reason}")]
    Compile {
        name: String,
        part: &'static str,
        reason: String,
    },
    #[error("template {0} has no subject.hbs or html.hbs")]
    Incomplete(String),
}

/// Every template under `templates.dir`, compiled.
pub struct Templates {
    /// HTML escaping on: html.hbs.
    html: Handlebars<'static>,
    /// No escaping: subject.hbs and text.hbs.
    plain: Handlebars<'static>,
    has_text: HashMap<String, bool>,
    /// Bytes of each template's sources: with the job's data, what a render costs.
    sizes: HashMap<String, usize>,
}

impl Templates {
    pub fn load(dir: &Path, strict: bool) -> Result<Self, TemplateError> {
        let mut html = Handlebars::new();
        let mut plain = Handlebars::new();
        plain.register_escape_fn(handlebars::no_escape);
        html.register_escape_fn(escape_html);
        html.set_strict_mode(strict);
        plain.set_strict_mode(strict);
        let mut has_text = HashMap::new();
        let mut sizes = HashMap::new();
        let entries =
            std::fs::read_dir(dir).map_err(|e| TemplateError::Dir(dir.display().to_string(), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| TemplateError::Dir(dir.display().to_string(), e))?;
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            let read = |file: &str| std::fs::read_to_string(path.join(file)).ok();
            let (Some(subject), Some(body)) = (read("subject.hbs"), read("html.hbs")) else {
                return Err(TemplateError::Incomplete(name));
            };
            let compile = |reg: &mut Handlebars<'static>, part: &'static str, src: &str| {
                reg.register_template_string(&format!("{name}/{part}"), src)
                    .map_err(|e| TemplateError::Compile {
                        name: name.clone(),
                        part,
                        reason: e.to_string(),
                    })
            };
            compile(
                &mut plain,
                "subject",
                subject.trim_end_matches(['\r', '\n']),
            )?;
            compile(&mut html, "html", &body)?;
            let text = read("text.hbs");
            if let Some(text) = &text {
                compile(&mut plain, "text", text)?;
            }
            sizes.insert(
                name.clone(),
                subject.len() + body.len() + text.as_ref().map_or(0, String::len),
            );
            has_text.insert(name, text.is_some());
        }
        Ok(Templates {
            html,
            plain,
            has_text,
            sizes,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.has_text.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.has_text.contains_key(name)
    }

    /// Bytes of the template's sources (0 for an unknown one).
    pub fn size(&self, name: &str) -> usize {
        self.sizes.get(name).copied().unwrap_or(0)
    }
}

/// The personalized parts of one message.
pub struct Parts {
    pub subject: String,
    pub html: String,
    pub text: String,
}

pub use crate::escape::escape_html;

/// The current Unix time in seconds, written as decimal into `buf`.
fn unix_now(buf: &mut [u8; 20]) -> &str {
    let mut n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// Turns a job into signed MIME bytes.
pub struct Renderer {
    templates: Templates,
    signer: Signer,
    dkim: DkimKeys,
    base_url: String,
    tracking: bool,
    from: Mailbox,
    reply_to: Option<Mailbox>,
    max_bytes: usize,
    /// Relaying through SendGrid (`[providers] sendgrid_public_key`): each message carries
    /// `X-SMTPAPI` unique args naming its job, which SendGrid's event webhook returns.
    sendgrid: bool,
    /// Taking SES notifications (`[providers] ses_topics`): a marketing message carries
    /// `X-Paloma-Touch`, which SES returns with the original headers.
    ses: bool,
    /// `[bounces]` on: the Message-ID's local part is the job's return-path token (without
    /// `b-`), so a bounce that quotes only the original Message-ID still names its job.
    return_paths: Option<crate::bounces::ReturnPaths>,
}

/// Why the renderer could not be built from the config and the templates.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("sender.from: {0}")]
    From(crate::job::AddressError),
    #[error("sender.reply_to: {0}")]
    ReplyTo(crate::job::AddressError),
    #[error("experiments ({campaign}): variant {variant:?} names template {template:?}, which is not in templates.dir")]
    MissingTemplate {
        campaign: String,
        variant: String,
        template: String,
    },
    #[error("experiments: the subject of {key}: {reason}")]
    Subject { key: String, reason: String },
}

impl Renderer {
    pub fn new(
        settings: &Settings,
        templates: Templates,
        dkim: DkimKeys,
    ) -> Result<Self, SetupError> {
        let from = Mailbox::parse(&settings.sender.from).map_err(SetupError::From)?;
        let reply_to = settings
            .sender
            .reply_to
            .as_deref()
            .map(Mailbox::parse)
            .transpose()
            .map_err(SetupError::ReplyTo)?;
        let mut templates = templates;
        for x in &settings.experiments {
            for v in &x.variants {
                if let Some(t) = &v.template {
                    if !templates.contains(t) {
                        return Err(SetupError::MissingTemplate {
                            campaign: x.campaign.clone(),
                            variant: v.name.clone(),
                            template: t.clone(),
                        });
                    }
                }
            }
        }
        for (key, source) in crate::experiment::Experiments::subjects(&settings.experiments) {
            templates
                .plain
                .register_template_string(&key, source)
                .map_err(|e| SetupError::Subject {
                    key: key.clone(),
                    reason: e.to_string(),
                })?;
        }
        let t = &settings.tracking;
        Ok(Renderer {
            templates,
            signer: Signer::new(
                &t.key_id,
                t.secret.expose(),
                &t.old_secrets
                    .iter()
                    .map(|(k, v)| (k.clone(), v.expose().to_string()))
                    .collect(),
            ),
            dkim,
            base_url: t.base_url.trim_end_matches('/').to_string(),
            tracking: t.enabled,
            from,
            reply_to,
            max_bytes: settings.delivery.max_message_bytes,
            sendgrid: settings.providers.sendgrid_public_key.is_some(),
            ses: !settings.providers.ses_topics.is_empty(),
            return_paths: crate::bounces::ReturnPaths::new(settings),
        })
    }

    pub fn templates(&self) -> &Templates {
        &self.templates
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// The unsubscribe link of a job.
    pub fn unsubscribe_url(&self, job: &Job) -> String {
        let mut url = String::with_capacity(self.base_url.len() + 128);
        url.push_str(&self.base_url);
        url.push_str("/u/");
        let (id, campaign, to) = (job.id.as_str(), job.campaign.as_str(), job.to.as_str());
        let variant = job.variant.as_deref().unwrap_or("");
        let touch = job.touch.map_or("", crate::policy::touches::bucket);
        if variant.is_empty() && touch.is_empty() {
            self.signer
                .sign_into(&mut url, Kind::Unsubscribe, &[id, campaign, to]);
        } else {
            // The same places as in open and click tokens (no URL, link or time).
            self.signer.sign_into(
                &mut url,
                Kind::Unsubscribe,
                &[id, campaign, to, "", "", "", variant, touch],
            );
        }
        url
    }

    /// Subject, HTML (tracked) and text for a job. Consumes the job's data.
    pub fn parts(&self, job: &mut Job, unsubscribe_url: &str) -> Result<Parts, JobError> {
        let name = job.template.as_str();
        let Some(&has_text) = self.templates.has_text.get(name) else {
            return Err(JobError::UnknownTemplate(job.template.clone()));
        };
        let render_err = |e: handlebars::RenderError| JobError::Render {
            template: job.template.clone(),
            reason: e.to_string(),
        };
        let mut data = std::mem::take(&mut job.data);
        data.insert("to".into(), Value::String(job.to.as_str().to_string()));
        data.insert(
            "campaign".into(),
            Value::String(job.campaign.as_str().to_string()),
        );
        data.insert("id".into(), Value::String(job.id.as_str().to_string()));
        data.insert(
            "unsubscribe_url".into(),
            Value::String(unsubscribe_url.to_string()),
        );
        let ctx = Context::from(Value::Object(data));

        let mut key = String::with_capacity(name.len() + 8);
        let mut tpl = |part: &str| {
            key.clear();
            key.push_str(name);
            key.push('/');
            key.push_str(part);
            key.clone()
        };
        let subject_tpl = match &job.subject {
            Some(key) => key.clone(),
            None => tpl("subject"),
        };
        let subject = self
            .templates
            .plain
            .render_with_context(&subject_tpl, &ctx)
            .map_err(render_err)?;
        let subject = subject.trim();
        if subject.chars().any(|c| c.is_control() && c != '\t') {
            return Err(JobError::HeaderInjection("subject (rendered)".into()));
        }
        let subject = subject.to_string();
        let html = self
            .templates
            .html
            .render_with_context(&tpl("html"), &ctx)
            .map_err(render_err)?;
        let text = if has_text {
            Some(
                self.templates
                    .plain
                    .render_with_context(&tpl("text"), &ctx)
                    .map_err(render_err)?,
            )
        } else {
            None
        };
        let (html, text) = if self.tracking {
            let mut out = String::new();
            let mut sent = [0u8; 20];
            let who = html::LinkOwner {
                id: job.id.as_str(),
                campaign: job.campaign.as_str(),
                to: job.to.as_str(),
                sent: unix_now(&mut sent),
                variant: job.variant.as_deref().unwrap_or(""),
                touch: job.touch.map_or("", crate::policy::touches::bucket),
                transactional: job.transactional,
            };
            let text = match text {
                Some(t) => {
                    html::rewrite(&html, &self.base_url, &self.signer, &who, &mut out);
                    t
                }
                // One walk over the HTML for both the tracked copy and the text part.
                None => html::rewrite_and_text(&html, &self.base_url, &self.signer, &who, &mut out),
            };
            (out, text)
        } else {
            let text = text.unwrap_or_else(|| html::to_text(&html));
            (html, text)
        };
        Ok(Parts {
            subject,
            html,
            text,
        })
    }

    /// Renders a job into `out` (cleared first): the complete message, DKIM-signed when a key
    /// exists for the From domain. `scratch` is a second reusable buffer.
    pub fn render(
        &self,
        job: &mut Job,
        out: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
    ) -> Result<(), JobError> {
        let unsubscribe = self.unsubscribe_url(job);
        let parts = self.parts(job, &unsubscribe)?;
        let from = job.from.as_ref().unwrap_or(&self.from);
        let reply_to = job.reply_to.as_ref().or(self.reply_to.as_ref());
        let from_domain = from.addr.domain();

        let mut msg = MessageBuilder::new()
            .from(mailbox(from))
            .to(Address::new_address(
                job.to_name.as_deref().map(str::to_string),
                job.to.as_str().to_string(),
            ))
            .subject(parts.subject)
            .message_id(MessageId::new(match &self.return_paths {
                Some(rp) => rp.message_id(job.id.as_str(), from_domain),
                None => message_id(job.id.as_str(), from_domain),
            }))
            .header("List-Unsubscribe", URL::new(unsubscribe))
            .header(
                "List-Unsubscribe-Post",
                Raw::new("List-Unsubscribe=One-Click"),
            )
            .header(
                "Feedback-ID",
                Raw::new(format!("{}:paloma:{}", job.campaign, from_domain)),
            )
            .header(
                "X-Paloma-Campaign",
                Raw::new(job.campaign.as_str().to_string()),
            )
            .header("X-Paloma-Id", Raw::new(job.id.as_str().to_string()));
        // A provider's bounce or complaint is counted for the job's variant and touch
        // bucket too: they travel in the message, as its id does.
        let touch = job.touch.map(crate::policy::touches::bucket);
        if let Some(v) = &job.variant {
            msg = msg.header("X-Paloma-Variant", Raw::new(v.clone()));
        }
        if let (true, Some(t)) = (self.ses, touch) {
            msg = msg.header("X-Paloma-Touch", Raw::new(t));
        }
        if self.sendgrid {
            // JSON escapes every control character, so the value is one header line.
            let mut args = serde_json::json!({
                "paloma_id": job.id.as_str(),
                "paloma_campaign": job.campaign.as_str(),
            });
            if let Some(v) = &job.variant {
                args["paloma_variant"] = v.as_str().into();
            }
            if let Some(t) = touch {
                args["paloma_touch"] = t.into();
            }
            let args = serde_json::json!({ "unique_args": args });
            msg = msg.header("X-SMTPAPI", Raw::new(args.to_string()));
        }
        if let Some(r) = reply_to {
            msg = msg.reply_to(mailbox(r));
        }
        for (name, value) in &job.headers {
            msg = msg.header(
                name.clone(),
                mail_builder::headers::text::Text::new(value.clone()),
            );
        }
        let msg = msg.text_body(parts.text).html_body(parts.html);

        let target = if self.dkim.is_empty() {
            &mut *out
        } else {
            &mut *scratch
        };
        target.clear();
        msg.serialize(target);
        // Merge data may hold bare CR or LF, which some MIME encodings pass through: every
        // line ends in CRLF before signing, so what is signed is what goes on the wire and no
        // `<CR>.<CR>` can reach a receiver (SMTP smuggling).
        if let Some(fixed) = crlf_line_endings(target) {
            *target = fixed;
        }
        if !self.dkim.is_empty() {
            out.clear();
            let signed = self
                .dkim
                .sign_into(from_domain, scratch, out)
                .map_err(|e| JobError::Render {
                    template: job.template.clone(),
                    reason: e.to_string(),
                })?;
            if !signed {
                std::mem::swap(out, scratch);
            }
        }
        if out.len() > self.max_bytes {
            return Err(JobError::Oversize {
                size: out.len(),
                limit: self.max_bytes,
            });
        }
        Ok(())
    }

    /// The envelope sender (bounce address) for a job.
    pub fn mail_from<'a>(&'a self, job: &'a Job) -> &'a str {
        job.from.as_ref().unwrap_or(&self.from).addr.as_str()
    }
}

fn mailbox(m: &Mailbox) -> Address<'static> {
    Address::new_address(m.name.clone(), m.addr.as_str().to_string())
}

/// A stable Message-ID per job id: a resend of the same job carries the same id, so
/// receivers can recognise a duplicate.
fn message_id(id: &str, domain: &str) -> String {
    let digest = Sha256::digest(id.as_bytes());
    let mut s = B64.encode(&digest[..18]);
    s.push('@');
    s.push_str(domain);
    s
}

/// `bytes` with every bare CR, bare LF (and CR CR LF) turned into CRLF, or None when every
/// line already ends in CRLF (the common case: one memchr2 pass, no copy).
pub fn crlf_line_endings(bytes: &[u8]) -> Option<Vec<u8>> {
    let bare = memchr::memchr2_iter(b'\r', b'\n', bytes).any(|i| match bytes[i] {
        b'\r' => bytes.get(i + 1) != Some(&b'\n'),
        _ => i == 0 || bytes[i - 1] != b'\r',
    });
    if !bare {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() + 64);
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if bytes.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_line_ending_becomes_crlf() {
        assert_eq!(super::crlf_line_endings(b"a\r\nb\r\n"), None);
        assert_eq!(super::crlf_line_endings(b""), None);
        let f = |s: &[u8]| super::crlf_line_endings(s).unwrap();
        assert_eq!(f(b"a\r.\rb"), b"a\r\n.\r\nb");
        assert_eq!(f(b"a\n.\nb\r"), b"a\r\n.\r\nb\r\n");
        assert_eq!(f(b"\nx\r\r\ny"), b"\r\nx\r\n\r\ny");
    }

    use super::*;

    #[test]
    fn escaping_matches_handlebars() {
        for v in [
            "",
            "plain",
            "a<b>&\"c\"='d'`e`",
            "ñandú & ☃ <x>",
            "&&&",
            "=",
        ] {
            assert_eq!(escape_html(v), handlebars::html_escape(v), "{v:?}");
        }
    }

    /// Whatever the data holds, rendering ends in Ok or Err, never a panic (a panic in a
    /// worker is a job without an outcome).
    #[test]
    fn hostile_data_never_panics_the_renderer() {
        let settings = Settings::from_toml(
            "[sender]\nfrom = \"Shop <news@shop.example>\"\nhelo = \"mta.shop.example\"\n[tracking]\nbase_url = \"https://t.shop.example\"\nsecret = \"test-secret-0123456789\"\n",
            Vec::new(),
        )
        .unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
        let r = Renderer::new(
            &settings,
            Templates::load(&dir, false).unwrap(),
            DkimKeys::load(&[]).unwrap(),
        )
        .unwrap();
        let long = "é&amp;<a href=\"x".repeat(2000);
        let nasty = [
            "H&M Größe",
            "&amp;M Größe&amp;",
            "&#1114112; &#xD800; &#99999999999999999999; &#x; &; &",
            "<a href=\"https://evil.example/\">x</a><!-- <a ",
            "javascript:alert(1)",
            "https://ok.example/?a=1&b=\u{1f}2",
            "\u{1f}\u{7f}\u{85}\u{2028}\u{feff}",
            "<",
            "<a",
            "<a ",
            "<a href=",
            "</body>",
            "ñ\u{3000}ñ\u{a0}ñ",
            "😀😀😀&😀;",
            long.as_str(),
            "",
        ];
        for t in ["newsletter", "receipt", "followup"] {
            for v in nasty {
                let product =
                    serde_json::json!({"name": v, "price": v, "url": v, "description": v});
                let data = serde_json::json!({"first_name": v, "name": v, "lang": v, "order": v,
                    "total": v, "products": [product.clone(), product.clone()], "items": [product]});
                let raw = serde_json::json!({"id": "j", "campaign": "c", "template": t,
                    "to": "a@b.example", "data": data})
                .to_string();
                let mut job = Job::parse(raw.as_bytes(), 1 << 22).unwrap();
                let (mut out, mut scratch) = (Vec::new(), Vec::new());
                let _ = r.render(&mut job, &mut out, &mut scratch);
            }
        }
    }

    #[test]
    fn unix_time_is_decimal() {
        let mut b = [0u8; 20];
        let t: u64 = unix_now(&mut b).parse().unwrap();
        assert!(t > 1_700_000_000);
    }
}

//! Checking a server's certificate chain after the session is up, without failing it: how
//! an MTA-STS policy in `testing` mode learns that `enforce` would have refused the session
//! (RFC 8461 §5: delivered as usual, the failure reported). Also the place a DANE check
//! (RFC 7672: the chain against TLSA records) would go.
//!
//! The chain is the one the server sent (`certificate_chain` of the session) and is checked
//! with rustls-webpki, as rustls itself would: the public roots (webpki-roots) plus
//! `delivery.tls_ca_file`, for the MX host's name, for TLS server use, at the current time.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

/// The roots a chain is checked against.
#[derive(Debug, Default)]
pub struct Roots {
    /// The public roots and those of `delivery.tls_ca_file`.
    anchors: Vec<TrustAnchor<'static>>,
}

impl Roots {
    /// The public roots and the CA certificates of `pem` (a `tls_ca_file`'s content), if any.
    pub fn with_pem(pem: Option<&[u8]>) -> Roots {
        let extra = pem.into_iter().flat_map(|pem| {
            CertificateDer::pem_slice_iter(pem)
                .filter_map(Result::ok)
                .filter_map(|der| {
                    webpki::anchor_from_trusted_cert(&der)
                        .ok()
                        .map(|a| a.to_owned())
                })
                .collect::<Vec<_>>()
        });
        Roots {
            anchors: webpki_roots::TLS_SERVER_ROOTS
                .iter()
                .cloned()
                .chain(extra)
                .collect(),
        }
    }

    /// Whether `chain` (DER, the server's certificate first) is valid for `host` now; Err
    /// says why not.
    pub fn verify(&self, chain: &[Vec<u8>], host: &str) -> Result<(), String> {
        let (leaf, rest) = chain.split_first().ok_or("no certificate")?;
        let leaf = CertificateDer::from(leaf.as_slice());
        let cert = webpki::EndEntityCert::try_from(&leaf).map_err(|e| e.to_string())?;
        let intermediates: Vec<CertificateDer<'_>> = rest
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.anchors,
            &intermediates,
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| format!("chain: {e}"))?;
        let name = ServerName::try_from(host).map_err(|e| e.to_string())?;
        cert.verify_is_valid_for_subject_name(&name)
            .map_err(|e| format!("name {host}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_and_garbage_are_not_valid() {
        let r = Roots::with_pem(Some(b"not a certificate"));
        assert!(r.verify(&[], "mx.test").is_err());
        assert!(r.verify(&[vec![1, 2, 3]], "mx.test").is_err());
    }
}

//! Envoy's `TlsParameters` cipher suite and curve lists, turned into the rustls crypto provider a TLS context uses.
//!
//! Names are Envoy's (BoringSSL's): `ECDHE-ECDSA-AES128-GCM-SHA256`, equal-preference groups such as
//! `[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]`, curves `X25519`, `P-256`, `P-384`. As in Envoy,
//! `cipher_suites` governs TLS 1.2 only: the TLS 1.3 suites are always offered. A name that is no cipher suite (or
//! curve) at all is an error naming the field; a real suite that rustls does not implement (static-RSA key exchange,
//! CBC modes) is left out with a warning, because Istio lists a few of those next to the ECDHE ones it relies on, and
//! an error only follows when nothing usable is left.

use std::sync::Arc;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tlspb;
use rustls::SupportedCipherSuite;
use rustls::crypto::ring::{cipher_suite as cs, kx_group};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use tracing::warn;

use crate::config::{ConfigError, join};

/// TLS 1.2 suites rustls implements, by Envoy's names.
const TLS12_SUITES: &[(&str, SupportedCipherSuite)] = &[
    ("ECDHE-ECDSA-AES128-GCM-SHA256", cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
    ("ECDHE-RSA-AES128-GCM-SHA256", cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256),
    ("ECDHE-ECDSA-AES256-GCM-SHA384", cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
    ("ECDHE-RSA-AES256-GCM-SHA384", cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384),
    ("ECDHE-ECDSA-CHACHA20-POLY1305", cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256),
    ("ECDHE-RSA-CHACHA20-POLY1305", cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256),
];

/// Suites Envoy accepts that rustls does not implement.
const UNIMPLEMENTED_SUITES: &[&str] = &[
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "ECDHE-PSK-AES128-CBC-SHA",
    "ECDHE-PSK-AES256-CBC-SHA",
    "ECDHE-PSK-CHACHA20-POLY1305",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA",
    "AES256-SHA",
    "PSK-AES128-CBC-SHA",
    "PSK-AES256-CBC-SHA",
    "DES-CBC3-SHA",
];

/// rustls's own TLS 1.3 order.
const TLS13_SUITES: &[SupportedCipherSuite] =
    &[cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_AES_128_GCM_SHA256, cs::TLS13_CHACHA20_POLY1305_SHA256];

/// The crypto provider for a context's `tls_params` (`path` names them in errors).
pub fn provider(params: Option<&tlspb::TlsParameters>, path: &str) -> Result<Arc<CryptoProvider>, ConfigError> {
    let mut provider = rustls::crypto::ring::default_provider();
    // Envoy's default curves are X25519 and P-256.
    provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1];
    let Some(p) = params else { return Ok(Arc::new(provider)) };
    if !p.cipher_suites.is_empty() {
        provider.cipher_suites = cipher_suites(&p.cipher_suites, &join(path, "cipher_suites"))?;
    }
    if !p.ecdh_curves.is_empty() {
        provider.kx_groups = curves(&p.ecdh_curves, &join(path, "ecdh_curves"))?;
    }
    Ok(Arc::new(provider))
}

fn cipher_suites(names: &[String], path: &str) -> Result<Vec<SupportedCipherSuite>, ConfigError> {
    let mut tls12 = Vec::new();
    for (i, entry) in names.iter().enumerate() {
        // An equal-preference group lists its members in order here; rustls has no notion of equal preference.
        let members = entry.strip_prefix('[').and_then(|e| e.strip_suffix(']')).unwrap_or(entry);
        for name in members.split('|').map(str::trim) {
            if let Some((_, suite)) = TLS12_SUITES.iter().find(|(n, _)| *n == name) {
                if !tls12.contains(suite) {
                    tls12.push(*suite);
                }
            } else if UNIMPLEMENTED_SUITES.contains(&name) {
                warn!(field = %join(path, &format!("[{i}]")), "cipher suite {name} is not implemented by rustls; left out");
            } else {
                return Err(ConfigError::new(join(path, &format!("[{i}]")), format!("unknown cipher suite '{name}'")));
            }
        }
    }
    if tls12.is_empty() {
        return Err(ConfigError::new(
            path,
            format!("none of the cipher suites is supported (rustls implements: {})", supported_names()),
        ));
    }
    Ok(TLS13_SUITES.iter().copied().chain(tls12).collect())
}

fn supported_names() -> String {
    TLS12_SUITES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

fn curves(names: &[String], path: &str) -> Result<Vec<&'static dyn SupportedKxGroup>, ConfigError> {
    let mut out: Vec<&'static dyn SupportedKxGroup> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let group = match name.as_str() {
            "X25519" => kx_group::X25519,
            "P-256" => kx_group::SECP256R1,
            "P-384" => kx_group::SECP384R1,
            other => {
                return Err(ConfigError::new(
                    join(path, &format!("[{i}]")),
                    format!("curve '{other}' is not supported (X25519, P-256 and P-384 are)"),
                ));
            }
        };
        if !out.iter().any(|g| g.name() == group.name()) {
            out.push(group);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(suites: &[&str], curves: &[&str]) -> tlspb::TlsParameters {
        tlspb::TlsParameters {
            cipher_suites: suites.iter().map(|s| s.to_string()).collect(),
            ecdh_curves: curves.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn suite_names(p: &CryptoProvider) -> Vec<String> {
        p.cipher_suites.iter().map(|s| format!("{:?}", s.suite())).collect()
    }

    #[test]
    fn istio_inbound_list_keeps_its_ecdhe_suites_in_order_and_all_tls13_suites() {
        // The cipher_suites of the Istio fixture's inbound DownstreamTlsContext.
        let istio = [
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-RSA-AES256-GCM-SHA384",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-RSA-AES128-GCM-SHA256",
            "AES256-GCM-SHA384",
            "AES128-GCM-SHA256",
        ];
        let p = provider(Some(&params(&istio, &[])), "tls_params").unwrap();
        let names = suite_names(&p);
        assert_eq!(names.len(), 3 + 4, "{names:?}");
        assert!(names[..3].iter().all(|n| n.starts_with("TLS13_")), "{names:?}");
        assert_eq!(names[3], "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384");
        assert_eq!(names[6], "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256");
    }

    #[test]
    fn equal_preference_groups_and_curves_are_understood() {
        let p = provider(
            Some(&params(&["[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]"], &["P-256", "X25519"])),
            "tls_params",
        )
        .unwrap();
        assert_eq!(suite_names(&p).len(), 3 + 2);
        let groups: Vec<String> = p.kx_groups.iter().map(|g| format!("{:?}", g.name())).collect();
        assert_eq!(groups, ["secp256r1", "X25519"]);
    }

    #[test]
    fn defaults_are_envoys_curves() {
        let p = provider(None, "tls_params").unwrap();
        let groups: Vec<String> = p.kx_groups.iter().map(|g| format!("{:?}", g.name())).collect();
        assert_eq!(groups, ["X25519", "secp256r1"]);
    }

    #[test]
    fn errors_name_the_entry() {
        let e = provider(Some(&params(&["ECDHE-ECDSA-AES128-GCM-SHA256", "NOT-A-SUITE"], &[])), "ctx.tls_params");
        let e = e.unwrap_err().to_string();
        assert!(e.contains("ctx.tls_params.cipher_suites[1]") && e.contains("NOT-A-SUITE"), "{e}");
        let e = provider(Some(&params(&["AES128-SHA"], &[])), "p").unwrap_err().to_string();
        assert!(e.contains("p.cipher_suites") && e.contains("none of the cipher suites"), "{e}");
        let e = provider(Some(&params(&[], &["P-521"])), "p").unwrap_err().to_string();
        assert!(e.contains("p.ecdh_curves[0]") && e.contains("P-521"), "{e}");
    }
}

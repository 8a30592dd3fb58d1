//! Downstream TLS termination for a filter chain (`envoy.transport_sockets.tls` with a `DownstreamTlsContext`):
//! the validated rustls server configuration, shared by every worker, and the peer checks rustls does not do
//! itself (Envoy's `match_typed_subject_alt_names`).
//!
//! Certificates come inline or from files; SDS secrets are refused by the field audit until they are implemented, so
//! nothing configured is silently ignored. Cipher suite and curve lists are read by [`params`].

pub mod params;

use std::sync::Arc;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tlspb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::Any;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::listener::{data_source, decode_any};
use crate::config::{ConfigError, join};
use crate::stats::{Counter, Store};

pub const TYPE_DOWNSTREAM_TLS: &str = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
pub const TYPE_UPSTREAM_TLS: &str = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// A cluster's TLS client side (`UpstreamTlsContext`).
#[derive(Debug)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    /// The `sni` to send; None sends none (the host's address stands in for rustls).
    sni: Option<rustls::pki_types::ServerName<'static>>,
}

impl UpstreamTls {
    /// `default_alpn` is offered when the context lists none (Envoy offers `h2` to a cluster configured for HTTP/2).
    pub fn from_any(any: &Any, path: &str, default_alpn: &[&str]) -> Result<UpstreamTls, ConfigError> {
        let ctx: tlspb::UpstreamTlsContext = decode_any(any, path)?;
        let cpath = join(path, "common_tls_context");
        let default = tlspb::CommonTlsContext::default();
        let common = ctx.common_tls_context.as_ref().unwrap_or(&default);
        let versions = versions(common.tls_params.as_ref(), &join(&cpath, "tls_params"))?;
        let provider = params::provider(common.tls_params.as_ref(), &join(&cpath, "tls_params"))?;
        let mut san = Vec::new();
        let roots = match &common.validation_context_type {
            Some(tlspb::common_tls_context::ValidationContextType::ValidationContext(v)) => {
                let vpath = join(&cpath, "validation_context");
                for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
                    san.push(san_matcher(m, &join(&vpath, &format!("match_typed_subject_alt_names[{i}]")))?);
                }
                san.extend(legacy_san_matchers(v, &vpath)?);
                Some(Arc::new(roots(v.trusted_ca.as_ref(), &join(&vpath, "trusted_ca"))?))
            }
            // Envoy does not verify an upstream's certificate without a validation context.
            None => None,
            Some(_) => {
                return Err(ConfigError::new(
                    join(&cpath, "validation_context_type"),
                    "only an inline validation_context is supported (no SDS or combined validation context yet)",
                ));
            }
        };
        let verifier =
            Arc::new(UpstreamVerifier { roots, san, algorithms: provider.signature_verification_algorithms });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(|e| ConfigError::new(join(&cpath, "tls_params"), e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match common.tls_certificates.as_slice() {
            [] => builder.with_no_client_auth(),
            [cert] => {
                let cert_path = join(&cpath, "tls_certificates[0]");
                let (chain, key) = certificate(cert, &cert_path)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| ConfigError::new(cert_path, e.to_string()))?
            }
            _ => {
                return Err(ConfigError::new(
                    join(&cpath, "tls_certificates"),
                    "more than one client certificate is not supported",
                ));
            }
        };
        config.alpn_protocols = if common.alpn_protocols.is_empty() {
            default_alpn.iter().map(|p| p.as_bytes().to_vec()).collect()
        } else {
            common.alpn_protocols.iter().map(|p| p.as_bytes().to_vec()).collect()
        };
        let sni = if ctx.sni.is_empty() {
            None
        } else {
            Some(
                rustls::pki_types::ServerName::try_from(ctx.sni.clone())
                    .map_err(|e| ConfigError::new(join(path, "sni"), e.to_string()))?,
            )
        };
        Ok(UpstreamTls { config: Arc::new(config), sni })
    }

    /// Runs the TLS handshake over a connected upstream socket.
    pub async fn connect(
        &self,
        stream: tokio::net::TcpStream,
        host: std::net::SocketAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let name = self.sni.clone().unwrap_or_else(|| rustls::pki_types::ServerName::IpAddress(host.ip().into()));
        tokio_rustls::TlsConnector::from(self.config.clone()).connect(name, stream).await
    }
}

/// Envoy's upstream certificate check: the chain must lead to the trusted CA (when one is configured) and, with
/// `match_typed_subject_alt_names`, carry a matching SAN. Unlike a browser, Envoy does not compare the certificate
/// with the SNI (Istio sends `outbound_.PORT_._.HOST` and matches the SPIFFE ID instead).
#[derive(Debug)]
struct UpstreamVerifier {
    roots: Option<Arc<rustls::RootCertStore>>,
    san: Vec<SanMatcher>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        if !self.san.is_empty() {
            let names = subject_alt_names(end_entity.as_ref());
            let ok = self.san.iter().any(|m| names.iter().any(|n| m.matches(n)));
            if !ok {
                return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName));
            }
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn roots(
    ca: Option<&envoy_types::pb::envoy::config::core::v3::DataSource>,
    path: &str,
) -> Result<rustls::RootCertStore, ConfigError> {
    let ca = data_source(ca, path)?;
    if ca.is_empty() {
        return Err(ConfigError::new(path, "a trusted CA is required"));
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(&ca).enumerate() {
        let cert = cert.map_err(|e| ConfigError::new(path, format!("certificate {i}: {e}")))?;
        roots.add(cert).map_err(|e| ConfigError::new(path, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ConfigError::new(path, "no PEM certificate found"));
    }
    Ok(roots)
}

/// A chain's TLS server side.
#[derive(Debug)]
pub struct DownstreamTls {
    pub config: Arc<rustls::ServerConfig>,
    san: Vec<SanMatcher>,
}

/// One `match_typed_subject_alt_names` entry, or one of the deprecated `match_subject_alt_names` (any name type).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SanMatcher {
    kind: Option<SanKind>,
    value: StringMatch,
}

impl SanMatcher {
    fn matches(&self, (kind, value): &(SanKind, String)) -> bool {
        self.kind.is_none_or(|k| k == *kind) && self.value.matches(value)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SanKind {
    Dns,
    Uri,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl StringMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(s) => v == s,
            StringMatch::Prefix(s) => v.starts_with(s.as_str()),
            StringMatch::Suffix(s) => v.ends_with(s.as_str()),
        }
    }
}

/// Why a peer was refused after its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerError {
    /// No presented subject alternative name matched (`ssl.fail_verify_san`).
    San,
}

/// Envoy's per-listener TLS stats (`listener.<addr>.ssl.*`), registered for chains that terminate TLS.
#[derive(Debug, Clone)]
pub struct SslStats {
    pub handshake: Counter,
    pub connection_error: Counter,
    pub fail_verify_san: Counter,
    pub no_certificate: Counter,
}

impl SslStats {
    pub fn new(store: &Store, listener_prefix: &str) -> Self {
        let c = |s: &str| store.counter(&format!("listener.{listener_prefix}.ssl.{s}"));
        SslStats {
            handshake: c("handshake"),
            connection_error: c("connection_error"),
            fail_verify_san: c("fail_verify_san"),
            no_certificate: c("no_certificate"),
        }
    }
}

impl DownstreamTls {
    pub fn from_any(any: &Any, path: &str) -> Result<DownstreamTls, ConfigError> {
        let ctx: tlspb::DownstreamTlsContext = decode_any(any, path)?;
        Self::convert(&ctx, path)
    }

    fn convert(ctx: &tlspb::DownstreamTlsContext, path: &str) -> Result<DownstreamTls, ConfigError> {
        let cpath = join(path, "common_tls_context");
        let common = ctx
            .common_tls_context
            .as_ref()
            .ok_or_else(|| ConfigError::new(&cpath, "a DownstreamTlsContext needs a common_tls_context"))?;
        let (chain, key) = match common.tls_certificates.as_slice() {
            [cert] => certificate(cert, &join(&cpath, "tls_certificates[0]"))?,
            [] => {
                return Err(ConfigError::new(
                    join(&cpath, "tls_certificates"),
                    "a TLS server needs one certificate (SDS secrets are not supported yet)",
                ));
            }
            _ => {
                return Err(ConfigError::new(
                    join(&cpath, "tls_certificates"),
                    "more than one certificate (selection by key type or SNI) is not supported",
                ));
            }
        };
        let versions = versions(common.tls_params.as_ref(), &join(&cpath, "tls_params"))?;
        let provider = params::provider(common.tls_params.as_ref(), &join(&cpath, "tls_params"))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| ConfigError::new(join(&cpath, "tls_params"), e.to_string()))?;

        let require_client = ctx.require_client_certificate.as_ref().is_some_and(|v| v.value);
        let mut san = Vec::new();
        let builder = match &common.validation_context_type {
            Some(tlspb::common_tls_context::ValidationContextType::ValidationContext(v)) => {
                let vpath = join(&cpath, "validation_context");
                let roots = roots(v.trusted_ca.as_ref(), &join(&vpath, "trusted_ca"))?;
                for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
                    san.push(san_matcher(m, &join(&vpath, &format!("match_typed_subject_alt_names[{i}]")))?);
                }
                san.extend(legacy_san_matchers(v, &vpath)?);
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                // Envoy verifies a presented certificate even when it does not require one.
                let verifier = if require_client { verifier } else { verifier.allow_unauthenticated() };
                let verifier =
                    verifier.build().map_err(|e| ConfigError::new(&vpath, format!("client verifier: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None if require_client => {
                return Err(ConfigError::new(
                    join(path, "require_client_certificate"),
                    "requiring a client certificate needs common_tls_context.validation_context",
                ));
            }
            None => builder.with_no_client_auth(),
            Some(_) => {
                return Err(ConfigError::new(
                    join(&cpath, "validation_context_type"),
                    "only an inline validation_context is supported (no SDS or combined validation context yet)",
                ));
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| ConfigError::new(join(&cpath, "tls_certificates[0]"), e.to_string()))?;
        config.alpn_protocols = common.alpn_protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok(DownstreamTls { config: Arc::new(config), san })
    }

    /// Checks the handshake's peer against `match_typed_subject_alt_names` (any match passes, as in Envoy).
    pub fn check_peer(&self, conn: &rustls::ServerConnection) -> Result<(), PeerError> {
        if self.san.is_empty() {
            return Ok(());
        }
        let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
            // Without a certificate there is nothing to match; require_client_certificate decides whether that is
            // allowed, and the verifier already enforced it.
            return Ok(());
        };
        let names = subject_alt_names(leaf.as_ref());
        let ok = self.san.iter().any(|m| names.iter().any(|n| m.matches(n)));
        if ok { Ok(()) } else { Err(PeerError::San) }
    }
}

fn certificate(
    c: &tlspb::TlsCertificate,
    path: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ConfigError> {
    let chain_pem = data_source(c.certificate_chain.as_ref(), &join(path, "certificate_chain"))?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::new(join(path, "certificate_chain"), e.to_string()))?;
    if chain.is_empty() {
        return Err(ConfigError::new(join(path, "certificate_chain"), "no PEM certificate found"));
    }
    let key_pem = data_source(c.private_key.as_ref(), &join(path, "private_key"))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| ConfigError::new(join(path, "private_key"), format!("no usable PEM private key: {e}")))?;
    Ok((chain, key))
}

fn versions(
    params: Option<&tlspb::TlsParameters>,
    path: &str,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, ConfigError> {
    use tlspb::tls_parameters::TlsProtocol;
    let Some(p) = params else { return Ok(vec![&rustls::version::TLS12, &rustls::version::TLS13]) };
    let version = |v: i32, field: &str, default: u8| -> Result<u8, ConfigError> {
        match TlsProtocol::try_from(v) {
            Ok(TlsProtocol::TlsAuto) => Ok(default),
            Ok(TlsProtocol::TlSv12) => Ok(2),
            Ok(TlsProtocol::TlSv13) => Ok(3),
            Ok(other) => Err(ConfigError::new(
                join(path, field),
                format!("{} is not supported (rustls speaks TLS 1.2 and 1.3)", other.as_str_name()),
            )),
            Err(_) => Err(ConfigError::new(join(path, field), format!("unknown TLS version {v}"))),
        }
    };
    let min = version(p.tls_minimum_protocol_version, "tls_minimum_protocol_version", 2)?;
    let max = version(p.tls_maximum_protocol_version, "tls_maximum_protocol_version", 3)?;
    let mut out = Vec::new();
    if min <= 2 && max >= 2 {
        out.push(&rustls::version::TLS12);
    }
    if max >= 3 {
        out.push(&rustls::version::TLS13);
    }
    if out.is_empty() {
        return Err(ConfigError::new(path, "the minimum TLS version is above the maximum"));
    }
    Ok(out)
}

fn san_matcher(m: &tlspb::SubjectAltNameMatcher, path: &str) -> Result<SanMatcher, ConfigError> {
    use tlspb::subject_alt_name_matcher::SanType;
    let kind = match SanType::try_from(m.san_type) {
        Ok(SanType::Dns) => SanKind::Dns,
        Ok(SanType::Uri) => SanKind::Uri,
        _ => {
            return Err(ConfigError::new(join(path, "san_type"), "only DNS and URI subject alt names are supported"));
        }
    };
    let sm = m.matcher.as_ref().ok_or_else(|| ConfigError::new(join(path, "matcher"), "a matcher is required"))?;
    Ok(SanMatcher { kind: Some(kind), value: string_match(sm, &join(path, "matcher"))? })
}

/// The deprecated `match_subject_alt_names`, which Istio still sends: each matches a name of any type.
fn legacy_san_matchers(v: &tlspb::CertificateValidationContext, path: &str) -> Result<Vec<SanMatcher>, ConfigError> {
    #[allow(deprecated)]
    let legacy = &v.match_subject_alt_names;
    legacy
        .iter()
        .enumerate()
        .map(|(i, sm)| {
            let value = string_match(sm, &join(path, &format!("match_subject_alt_names[{i}]")))?;
            Ok(SanMatcher { kind: None, value })
        })
        .collect()
}

fn string_match(sm: &matcher::StringMatcher, path: &str) -> Result<StringMatch, ConfigError> {
    use matcher::string_matcher::MatchPattern;
    if sm.ignore_case {
        return Err(ConfigError::new(join(path, "ignore_case"), "ignore_case is not supported here"));
    }
    match &sm.match_pattern {
        Some(MatchPattern::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
        Some(MatchPattern::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
        Some(MatchPattern::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
        _ => Err(ConfigError::new(path, "only exact, prefix and suffix subject alt name matchers are supported")),
    }
}

/// The DNS (`[2]`) and URI (`[6]`, SPIFFE IDs) subject alternative names of a DER certificate. The structure is
/// walked (Certificate → TBSCertificate → `[3]` extensions → the subjectAltName extension, OID 2.5.29.17) rather
/// than searched, so bytes inside the subject or another field can never pass for names. The certificate was
/// verified before this runs; only names are read.
fn subject_alt_names(der: &[u8]) -> Vec<(SanKind, String)> {
    walk_san(der).unwrap_or_default()
}

fn walk_san(der: &[u8]) -> Option<Vec<(SanKind, String)>> {
    const SEQUENCE: u8 = 0x30;
    const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];
    let (tag, cert, _) = tlv_tagged(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = tlv_tagged(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    // TBSCertificate fields in order; the extensions are the explicitly tagged [3] one.
    let mut fields = tbs;
    let extensions = loop {
        let (tag, value, rest) = tlv_tagged(fields)?;
        if tag == 0xa3 {
            break value;
        }
        fields = rest;
    };
    let (tag, mut list, _) = tlv_tagged(extensions)?;
    if tag != SEQUENCE {
        return None;
    }
    while !list.is_empty() {
        let (tag, ext, rest) = tlv_tagged(list)?;
        list = rest;
        if tag != SEQUENCE {
            return None;
        }
        let (tag, oid, mut after) = tlv_tagged(ext)?;
        if tag != 0x06 || oid != SAN_OID {
            continue;
        }
        // Optional `critical` BOOLEAN, then the OCTET STRING that wraps the GeneralNames SEQUENCE.
        let (mut tag, mut value, rest) = tlv_tagged(after)?;
        if tag == 0x01 {
            after = rest;
            (tag, value, _) = tlv_tagged(after)?;
        }
        if tag != 0x04 {
            return None;
        }
        let (tag, mut names, _) = tlv_tagged(value)?;
        if tag != SEQUENCE {
            return None;
        }
        let mut out = Vec::new();
        while !names.is_empty() {
            let (tag, value, rest) = tlv_tagged(names)?;
            names = rest;
            let kind = match tag {
                0x82 => SanKind::Dns,
                0x86 => SanKind::Uri,
                _ => continue,
            };
            if let Ok(s) = std::str::from_utf8(value) {
                out.push((kind, s.to_string()));
            }
        }
        return Some(out);
    }
    Some(Vec::new())
}

/// One DER TLV off `b`: (tag, value, rest).
fn tlv_tagged(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let (value, rest) = tlv(b)?;
    Some((tag, value, rest))
}

/// Splits one DER TLV off `b`: (value, rest).
fn tlv(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let len_byte = *b.get(1)?;
    let (len, header) = if len_byte & 0x80 == 0 {
        (usize::from(len_byte), 2)
    } else {
        let n = usize::from(len_byte & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*b.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let value = b.get(header..header.checked_add(len)?)?;
    Some((value, &b[header + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_alt_names_are_read_from_the_certificate() {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut params = rcgen::CertificateParams::new(vec!["a.svc".to_string(), "b.svc".to_string()])
            .unwrap_or_else(|e| panic!("{e}"));
        let uri = "spiffe://cluster.local/ns/x/sa/y";
        params.subject_alt_names.push(rcgen::SanType::URI(uri.try_into().unwrap_or_else(|e| panic!("{e:?}"))));
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        let names = subject_alt_names(cert.der());
        assert_eq!(
            names,
            vec![(SanKind::Dns, "a.svc".into()), (SanKind::Dns, "b.svc".into()), (SanKind::Uri, uri.into())]
        );
        assert!(subject_alt_names(b"\x30\x03garbage").is_empty(), "malformed DER yields no names, no panic");
    }

    #[test]
    fn upstream_alpn_defaults_to_what_the_cluster_speaks() {
        let ctx = tlspb::UpstreamTlsContext { sni: "backend.local".into(), ..Default::default() };
        let any = Any {
            type_url: format!("type.googleapis.com/{TYPE_UPSTREAM_TLS}"),
            value: prost::Message::encode_to_vec(&ctx),
        };
        let h2 = UpstreamTls::from_any(&any, "t", &["h2"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h2.config.alpn_protocols, vec![b"h2".to_vec()]);
        let plain = UpstreamTls::from_any(&any, "t", &[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(plain.config.alpn_protocols.is_empty());
    }

    #[test]
    fn versions_follow_tls_params() {
        use tlspb::tls_parameters::TlsProtocol;
        let p = |min: TlsProtocol, max: TlsProtocol| tlspb::TlsParameters {
            tls_minimum_protocol_version: min as i32,
            tls_maximum_protocol_version: max as i32,
            ..Default::default()
        };
        assert_eq!(versions(None, "p").map(|v| v.len()).ok(), Some(2));
        assert_eq!(versions(Some(&p(TlsProtocol::TlSv13, TlsProtocol::TlsAuto)), "p").map(|v| v.len()).ok(), Some(1));
        let err = versions(Some(&p(TlsProtocol::TlSv11, TlsProtocol::TlsAuto)), "p").err();
        assert_eq!(err.map(|e| e.path), Some("p.tls_minimum_protocol_version".to_string()));
    }

    #[test]
    fn deprecated_match_subject_alt_names_match_a_name_of_any_type() {
        let exact = |s: &str| matcher::StringMatcher {
            match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(s.into())),
            ..Default::default()
        };
        #[allow(deprecated)]
        let v = tlspb::CertificateValidationContext {
            match_subject_alt_names: vec![exact("spiffe://cluster.local/ns/a/sa/b"), exact("a.svc")],
            ..Default::default()
        };
        let m = legacy_san_matchers(&v, "vc").unwrap_or_else(|e| panic!("{e}"));
        assert!(m[0].matches(&(SanKind::Uri, "spiffe://cluster.local/ns/a/sa/b".into())));
        assert!(m[1].matches(&(SanKind::Dns, "a.svc".into())));
        assert!(!m[1].matches(&(SanKind::Dns, "b.svc".into())));
        #[allow(deprecated)]
        let bad = tlspb::CertificateValidationContext {
            match_subject_alt_names: vec![matcher::StringMatcher { ignore_case: true, ..exact("x") }],
            ..Default::default()
        };
        let e = legacy_san_matchers(&bad, "vc").err().map(|e| e.path);
        assert_eq!(e.as_deref(), Some("vc.match_subject_alt_names[0].ignore_case"));
    }
}

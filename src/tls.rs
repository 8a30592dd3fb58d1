//! TLS transport sockets: a filter chain's server side (`DownstreamTlsContext`) and a cluster's client side
//! (`UpstreamTlsContext`), and the peer checks rustls does not do itself (Envoy's `match_typed_subject_alt_names`).
//!
//! Certificates and validation contexts come inline, from files, or as secrets by name (static or SDS, see
//! [`crate::secret`]). A context keeps its rustls config per secret version: the first handshake after a rotation
//! builds it once for every worker, later ones share it, and nothing about the listener, the cluster or open
//! connections changes. Cipher suite and curve lists are read by [`params`].

pub mod params;

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tlspb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use tracing::warn;

use crate::config::listener::decode_any;
use crate::config::{ConfigError, join};
use crate::secret::{CertKey, Secret, SecretBinding, SecretError, SecretRef, SecretRegistry, Validation};
use crate::stats::{Counter, Store};

pub const TYPE_DOWNSTREAM_TLS: &str = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
pub const TYPE_UPSTREAM_TLS: &str = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// A context's certificate and CA in force now (for /certs); None where there is none (yet).
pub type InUse = (Option<Arc<CertKey>>, Option<Arc<Validation>>);

/// Where a context's own certificate comes from.
#[derive(Debug)]
enum CertSource {
    None,
    Inline(Arc<CertKey>),
    Sds(SecretBinding),
}

/// Where a context's peer validation comes from.
#[derive(Debug)]
enum ValidationSource {
    None,
    Inline(Arc<Validation>),
    Sds(SecretBinding),
    /// Envoy's `combined_validation_context`: the SDS context merged into the default one as protobuf merges (the
    /// secret's set fields win, lists append), so a static SAN list is kept while SDS rotates the CA.
    Combined {
        default: Box<tlspb::CertificateValidationContext>,
        sds: SecretBinding,
    },
}

/// The certificate and validation settings of a `CommonTlsContext`, resolved against secrets on each handshake.
#[derive(Debug)]
struct Sources {
    cert: CertSource,
    validation: ValidationSource,
    /// `common_tls_context`'s path, for errors of a build.
    path: String,
}

/// What a build consumed: the secret versions (pointer identity) and, from them, the material.
struct Material<'a> {
    cert: Option<&'a Arc<CertKey>>,
    validation: Option<Arc<Validation>>,
}

impl Sources {
    fn parse(common: &tlspb::CommonTlsContext, cpath: &str) -> Result<Sources, ConfigError> {
        use tlspb::common_tls_context::ValidationContextType;
        let cert = match (common.tls_certificates.as_slice(), common.tls_certificate_sds_secret_configs.as_slice()) {
            ([], []) => CertSource::None,
            ([c], []) => CertSource::Inline(crate::secret::certified_key(c, &join(cpath, "tls_certificates[0]"))?),
            ([], [s]) => {
                let path = join(cpath, "tls_certificate_sds_secret_configs[0]");
                CertSource::Sds(SecretBinding::new(SecretRef::from_proto(s, &path)?, path))
            }
            ([_, ..], [_, ..]) => {
                return Err(ConfigError::new(
                    join(cpath, "tls_certificate_sds_secret_configs"),
                    "tls_certificates and tls_certificate_sds_secret_configs cannot both be set",
                ));
            }
            ([], _) => {
                return Err(ConfigError::new(
                    join(cpath, "tls_certificate_sds_secret_configs"),
                    "more than one certificate (selection by key type or SNI) is not supported",
                ));
            }
            (_, _) => {
                return Err(ConfigError::new(
                    join(cpath, "tls_certificates"),
                    "more than one certificate (selection by key type or SNI) is not supported",
                ));
            }
        };
        let validation = match &common.validation_context_type {
            None => ValidationSource::None,
            Some(ValidationContextType::ValidationContext(v)) => {
                ValidationSource::Inline(Arc::new(Validation::from_proto(v, &join(cpath, "validation_context"))?))
            }
            Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => {
                let path = join(cpath, "validation_context_sds_secret_config");
                ValidationSource::Sds(SecretBinding::new(SecretRef::from_proto(s, &path)?, path))
            }
            Some(ValidationContextType::CombinedValidationContext(c)) => {
                let path = join(cpath, "combined_validation_context");
                let default = c.default_validation_context.clone().ok_or_else(|| {
                    ConfigError::new(
                        join(&path, "default_validation_context"),
                        "a default validation context is required",
                    )
                })?;
                // Checked now for what can be checked alone; the merge is checked when the secret arrives.
                for (i, m) in default.match_typed_subject_alt_names.iter().enumerate() {
                    san_matcher(
                        m,
                        &join(&path, &format!("default_validation_context.match_typed_subject_alt_names[{i}]")),
                    )?;
                }
                legacy_san_matchers(&default, &join(&path, "default_validation_context"))?;
                let spath = join(&path, "validation_context_sds_secret_config");
                let sds = c
                    .validation_context_sds_secret_config
                    .as_ref()
                    .ok_or_else(|| ConfigError::new(&spath, "an SDS secret config is required"))?;
                ValidationSource::Combined {
                    default: Box::new(default),
                    sds: SecretBinding::new(SecretRef::from_proto(sds, &spath)?, spath),
                }
            }
            Some(_) => {
                return Err(ConfigError::new(
                    join(cpath, "validation_context_type"),
                    "only validation_context, validation_context_sds_secret_config and combined_validation_context \
                     are supported",
                ));
            }
        };
        Ok(Sources { cert, validation, path: cpath.to_string() })
    }

    /// The certificate and CA in force now (what /certs shows); None where there is none yet.
    fn in_use(&self) -> InUse {
        let (cert, validation) = self.versions();
        match self.material(cert.as_ref(), validation.as_ref()) {
            Ok(m) => (m.cert.cloned(), m.validation),
            Err(_) => (None, None),
        }
    }

    fn bindings(&self) -> impl Iterator<Item = &SecretBinding> {
        let cert = match &self.cert {
            CertSource::Sds(b) => Some(b),
            _ => None,
        };
        let validation = match &self.validation {
            ValidationSource::Sds(b) | ValidationSource::Combined { sds: b, .. } => Some(b),
            _ => None,
        };
        cert.into_iter().chain(validation)
    }

    /// The secret versions in force now: (certificate, validation); None where the source is not a secret.
    fn versions(&self) -> (Option<Arc<Secret>>, Option<Arc<Secret>>) {
        let cert = match &self.cert {
            CertSource::Sds(b) => b.current(),
            _ => None,
        };
        let validation = match &self.validation {
            ValidationSource::Sds(b) | ValidationSource::Combined { sds: b, .. } => b.current(),
            _ => None,
        };
        (cert, validation)
    }

    /// The material for these versions, or why there is none yet.
    fn material<'a>(
        &'a self,
        cert: Option<&'a Arc<Secret>>,
        validation: Option<&'a Arc<Secret>>,
    ) -> Result<Material<'a>, ConfigError> {
        let not_ready =
            |b: &SecretBinding| ConfigError::new(&b.path, format!("secret '{}' is not ready", b.reference.name));
        let cert = match &self.cert {
            CertSource::None => None,
            CertSource::Inline(k) => Some(k),
            CertSource::Sds(b) => {
                let s = cert.ok_or_else(|| not_ready(b))?;
                Some(s.certificate().ok_or_else(|| wrong_kind(b, "validation context", "certificate"))?)
            }
        };
        let validation = match &self.validation {
            ValidationSource::None => None,
            ValidationSource::Inline(v) => Some(v.clone()),
            ValidationSource::Sds(b) => {
                let s = validation.ok_or_else(|| not_ready(b))?;
                Some(s.validation().ok_or_else(|| wrong_kind(b, "certificate", "validation context"))?.0.clone())
            }
            ValidationSource::Combined { default, sds } => {
                let s = validation.ok_or_else(|| not_ready(sds))?;
                let (_, dynamic) =
                    s.validation().ok_or_else(|| wrong_kind(sds, "certificate", "validation context"))?;
                let mut merged = (**default).clone();
                merged
                    .merge(dynamic.encode_to_vec().as_slice())
                    .map_err(|e| ConfigError::new(join(&self.path, "combined_validation_context"), e.to_string()))?;
                Some(Arc::new(Validation::from_proto(&merged, &join(&self.path, "combined_validation_context"))?))
            }
        };
        Ok(Material { cert, validation })
    }
}

fn wrong_kind(b: &SecretBinding, found: &str, expected: &str) -> ConfigError {
    ConfigError::new(&b.path, format!("secret '{}' is a {found}, not a {expected}", b.reference.name))
}

/// One build per combination of secret versions, shared by every worker: the handshake path compares pointers and
/// builds only when a secret changed (a failed build is kept too, so a bad combination is not retried per handshake).
#[derive(Debug)]
struct PerVersion<T> {
    built: ArcSwapOption<Built<T>>,
    building: Mutex<()>,
}

#[derive(Debug)]
struct Built<T> {
    cert: Option<Arc<Secret>>,
    validation: Option<Arc<Secret>>,
    result: Result<Arc<T>, String>,
}

fn same(a: &Option<Arc<Secret>>, b: &Option<Arc<Secret>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

impl<T> PerVersion<T> {
    fn new() -> Self {
        PerVersion { built: ArcSwapOption::empty(), building: Mutex::new(()) }
    }

    fn get(
        &self,
        sources: &Sources,
        build: impl FnOnce(&Material<'_>) -> Result<T, ConfigError>,
    ) -> Result<Arc<T>, String> {
        let (cert, validation) = sources.versions();
        let hit = |b: &Built<T>| same(&b.cert, &cert) && same(&b.validation, &validation);
        if let Some(b) = self.built.load().as_ref()
            && hit(b)
        {
            return b.result.clone();
        }
        let _one_builder = self.building.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = self.built.load().as_ref()
            && hit(b)
        {
            return b.result.clone();
        }
        let result = sources.material(cert.as_ref(), validation.as_ref()).and_then(|m| build(&m));
        let result = result.map(Arc::new).map_err(|e| e.to_string());
        if let Err(e) = &result {
            warn!("TLS context cannot be built: {e}");
        }
        self.built.store(Some(Arc::new(Built { cert, validation, result: result.clone() })));
        result
    }
}

/// A cluster's TLS client side (`UpstreamTlsContext`).
#[derive(Debug)]
pub struct UpstreamTls {
    sources: Sources,
    /// Cipher suites and curves (`tls_params`), the same for every secret version.
    provider: Arc<rustls::crypto::CryptoProvider>,
    versions: Vec<&'static rustls::SupportedProtocolVersion>,
    alpn: Vec<Vec<u8>>,
    /// The `sni` to send; None sends none (the host's address stands in for rustls).
    sni: Option<rustls::pki_types::ServerName<'static>>,
    /// The cluster's `auto_san_validation`: a connection made with an automatic SNI must present a certificate
    /// whose DNS SAN matches that name (instead of the configured SAN matchers).
    auto_san: bool,
    built: PerVersion<rustls::ClientConfig>,
}

impl UpstreamTls {
    /// `default_alpn` is offered when the context lists none (Envoy offers `h2` to a cluster configured for HTTP/2).
    pub fn from_any(any: &Any, path: &str, default_alpn: &[&str], auto_san: bool) -> Result<UpstreamTls, ConfigError> {
        let ctx: tlspb::UpstreamTlsContext = decode_any(any, path)?;
        let cpath = join(path, "common_tls_context");
        let default = tlspb::CommonTlsContext::default();
        let common = ctx.common_tls_context.as_ref().unwrap_or(&default);
        let versions = versions(common.tls_params.as_ref(), &join(&cpath, "tls_params"))?;
        let alpn = if common.alpn_protocols.is_empty() {
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
        let provider = params::provider(common.tls_params.as_ref(), &join(&cpath, "tls_params"))?;
        let sources = Sources::parse(common, &cpath)?;
        let tls = UpstreamTls { sources, provider, versions, alpn, sni, auto_san, built: PerVersion::new() };
        if tls.sources.bindings().next().is_none() {
            // Inline only: built (and judged) now, so a bad config is an error of the config.
            let built = tls.build_material(&tls.sources.material(None, None)?)?;
            tls.built.store_inline(built);
        }
        Ok(tls)
    }

    /// The secrets this context refers to, for binding, warming and dumps.
    pub fn secrets(&self) -> impl Iterator<Item = &SecretBinding> {
        self.sources.bindings()
    }

    /// Binds the context's secret references to the registry's slots.
    pub fn bind(&self, registry: &SecretRegistry) -> Result<(), SecretError> {
        self.sources.bindings().try_for_each(|b| registry.bind(b))
    }

    /// The client certificate and CA in force now, for /certs.
    pub fn in_use(&self) -> InUse {
        self.sources.in_use()
    }

    /// The client config for the secrets in force now.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.built.get(&self.sources, |m| self.build_material(m))
    }

    fn build_material(&self, m: &Material<'_>) -> Result<rustls::ClientConfig, ConfigError> {
        let provider = self.provider.clone();
        // Envoy does not verify an upstream's certificate without a validation context.
        let (roots, san) = match &m.validation {
            Some(v) => (Some(v.roots.clone()), v.san.clone()),
            None => (None, Vec::new()),
        };
        let verifier = Arc::new(UpstreamVerifier {
            roots,
            san,
            auto_san: self.auto_san,
            algorithms: provider.signature_verification_algorithms,
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&self.versions)
            .map_err(|e| ConfigError::new(join(&self.sources.path, "tls_params"), e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match m.cert {
            Some(key) => builder.with_client_cert_resolver(Arc::new(FixedCert(key.key.clone()))),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        Ok(config)
    }

    /// Runs the TLS handshake over a connected upstream socket; `auto_sni` (the request's host, with the cluster's
    /// `auto_sni`) replaces the configured `sni`.
    pub async fn connect(
        &self,
        stream: tokio::net::TcpStream,
        host: std::net::SocketAddr,
        auto_sni: Option<&str>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        // Envoy's "secrets not ready": the connection fails, the cluster stays.
        let config = self.client_config().map_err(std::io::Error::other)?;
        // With auto_san_validation the verifier checks the certificate against a DNS server name; Istio sets it only
        // without a configured `sni`, so a connection without an automatic one (an IP host) keeps the matchers.
        let name = match auto_sni.map(|n| rustls::pki_types::ServerName::try_from(n.to_string())) {
            Some(Ok(name)) => name,
            Some(Err(e)) => return Err(std::io::Error::other(format!("automatic SNI: {e}"))),
            None => self.sni.clone().unwrap_or_else(|| rustls::pki_types::ServerName::IpAddress(host.ip().into())),
        };
        tokio_rustls::TlsConnector::from(config).connect(name, stream).await
    }
}

impl<T> PerVersion<T> {
    fn store_inline(&self, built: T) {
        self.built.store(Some(Arc::new(Built { cert: None, validation: None, result: Ok(Arc::new(built)) })));
    }
}

/// A certificate that does not depend on the handshake: the context's one certificate of this version.
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for FixedCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Envoy's upstream certificate check: the chain must lead to the trusted CA (when one is configured) and, with
/// `match_typed_subject_alt_names`, carry a matching SAN. Unlike a browser, Envoy does not compare the certificate
/// with the SNI (Istio sends `outbound_.PORT_._.HOST` and matches the SPIFFE ID instead).
#[derive(Debug, Clone)]
struct UpstreamVerifier {
    roots: Option<Arc<rustls::RootCertStore>>,
    san: Vec<SanMatcher>,
    /// `auto_san_validation`: the certificate's DNS SANs must match the server name the handshake used (the
    /// automatic SNI), in place of `san`.
    auto_san: bool,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
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
        if self.auto_san
            && let rustls::pki_types::ServerName::DnsName(name) = server_name
        {
            let names = subject_alt_names(end_entity.as_ref());
            if !names.iter().any(|(kind, san)| *kind == SanKind::Dns && dns_name_matches(san, name.as_ref())) {
                return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName));
            }
        } else if !self.san.is_empty() {
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

/// A chain's TLS server side.
#[derive(Debug)]
pub struct DownstreamTls {
    sources: Sources,
    /// Cipher suites and curves (`tls_params`), the same for every secret version.
    provider: Arc<rustls::crypto::CryptoProvider>,
    versions: Vec<&'static rustls::SupportedProtocolVersion>,
    alpn: Vec<Vec<u8>>,
    require_client: bool,
    built: PerVersion<ServerSide>,
}

/// The server side for one combination of secret versions.
#[derive(Debug)]
pub struct ServerSide {
    pub config: Arc<rustls::ServerConfig>,
    san: Vec<SanMatcher>,
}

/// One `match_typed_subject_alt_names` entry, or one of the deprecated `match_subject_alt_names` (any name type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SanMatcher {
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
    /// The client's certificate did not verify against the trusted CA.
    pub fail_verify_error: Counter,
    /// A required client certificate was not presented.
    pub fail_verify_no_cert: Counter,
    pub no_certificate: Counter,
}

impl SslStats {
    pub fn new(store: &Store, listener_prefix: &str) -> Self {
        let c = |s: &str| store.counter(&format!("listener.{listener_prefix}.ssl.{s}"));
        SslStats {
            handshake: c("handshake"),
            connection_error: c("connection_error"),
            fail_verify_san: c("fail_verify_san"),
            fail_verify_error: c("fail_verify_error"),
            fail_verify_no_cert: c("fail_verify_no_cert"),
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
        let sources = Sources::parse(common, &cpath)?;
        if matches!(sources.cert, CertSource::None) {
            return Err(ConfigError::new(
                join(&cpath, "tls_certificates"),
                "a TLS server needs one certificate (tls_certificates or tls_certificate_sds_secret_configs)",
            ));
        }
        let require_client = ctx.require_client_certificate.as_ref().is_some_and(|v| v.value);
        if require_client && matches!(sources.validation, ValidationSource::None) {
            return Err(ConfigError::new(
                join(path, "require_client_certificate"),
                "requiring a client certificate needs a validation context in common_tls_context",
            ));
        }
        let tls = DownstreamTls {
            provider: params::provider(common.tls_params.as_ref(), &join(&cpath, "tls_params"))?,
            versions: versions(common.tls_params.as_ref(), &join(&cpath, "tls_params"))?,
            alpn: common.alpn_protocols.iter().map(|p| p.as_bytes().to_vec()).collect(),
            require_client,
            sources,
            built: PerVersion::new(),
        };
        if tls.sources.bindings().next().is_none() {
            let built = tls.build_material(&tls.sources.material(None, None)?)?;
            tls.built.store_inline(built);
        }
        Ok(tls)
    }

    /// The secrets this context refers to, for binding, warming and dumps.
    pub fn secrets(&self) -> impl Iterator<Item = &SecretBinding> {
        self.sources.bindings()
    }

    /// Binds the context's secret references to the registry's slots.
    pub fn bind(&self, registry: &SecretRegistry) -> Result<(), SecretError> {
        self.sources.bindings().try_for_each(|b| registry.bind(b))
    }

    /// The server certificate and CA in force now, for /certs.
    pub fn in_use(&self) -> InUse {
        self.sources.in_use()
    }

    /// The server side for the secrets in force now; an error (logged once per version) when a secret has not
    /// arrived or does not combine, and the handshake must fail (Envoy's "secrets not ready").
    pub fn server(&self) -> Result<Arc<ServerSide>, String> {
        self.built.get(&self.sources, |m| self.build_material(m))
    }

    fn build_material(&self, m: &Material<'_>) -> Result<ServerSide, ConfigError> {
        let cpath = &self.sources.path;
        let key = m.cert.ok_or_else(|| ConfigError::new(join(cpath, "tls_certificates"), "no certificate"))?;
        let provider = self.provider.clone();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&self.versions)
            .map_err(|e| ConfigError::new(join(cpath, "tls_params"), e.to_string()))?;
        let (builder, san) = match &m.validation {
            Some(v) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(v.roots.clone(), provider);
                // Envoy verifies a presented certificate even when it does not require one.
                let verifier = if self.require_client { verifier } else { verifier.allow_unauthenticated() };
                let verifier = verifier.build().map_err(|e| {
                    ConfigError::new(join(cpath, "validation_context"), format!("client verifier: {e}"))
                })?;
                (builder.with_client_cert_verifier(verifier), v.san.clone())
            }
            None => (builder.with_no_client_auth(), Vec::new()),
        };
        let mut config = builder.with_cert_resolver(Arc::new(FixedCert(key.key.clone())));
        config.alpn_protocols = self.alpn.clone();
        Ok(ServerSide { config: Arc::new(config), san })
    }
}

impl ServerSide {
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

pub(crate) fn san_matcher(m: &tlspb::SubjectAltNameMatcher, path: &str) -> Result<SanMatcher, ConfigError> {
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
pub(crate) fn legacy_san_matchers(
    v: &tlspb::CertificateValidationContext,
    path: &str,
) -> Result<Vec<SanMatcher>, ConfigError> {
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

/// What /certs reports of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The serial number's bytes without DER's sign padding.
    pub serial: Vec<u8>,
    pub not_before: std::time::SystemTime,
    pub not_after: std::time::SystemTime,
    /// (true for DNS, false for URI, the name).
    pub names: Vec<(bool, String)>,
}

/// Serial number, validity and names of a DER certificate, by walking TBSCertificate: `[0]` version (optional),
/// serialNumber, signature, issuer, validity. None when the structure is not what X.509 says.
pub fn certificate_info(der: &[u8]) -> Option<CertInfo> {
    let (_, cert, _) = tlv_tagged(der)?;
    let (_, tbs, _) = tlv_tagged(cert)?;
    let (mut tag, mut value, mut rest) = tlv_tagged(tbs)?;
    if tag == 0xa0 {
        (tag, value, rest) = tlv_tagged(rest)?;
    }
    if tag != 0x02 {
        return None;
    }
    let serial = value.iter().skip_while(|b| **b == 0).copied().collect();
    let (_, _, rest) = tlv_tagged(rest)?; // signature
    let (_, _, rest) = tlv_tagged(rest)?; // issuer
    let (tag, validity, _) = tlv_tagged(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (t1, v1, rest) = tlv_tagged(validity)?;
    let (t2, v2, _) = tlv_tagged(rest)?;
    let names = subject_alt_names(der).into_iter().map(|(k, v)| (k == SanKind::Dns, v)).collect();
    Some(CertInfo { serial, not_before: x509_time(t1, v1)?, not_after: x509_time(t2, v2)?, names })
}

/// UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn x509_time(tag: u8, v: &[u8]) -> Option<std::time::SystemTime> {
    let text = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    let digits = |s: &str| -> Option<i64> { s.bytes().all(|b| b.is_ascii_digit()).then(|| s.parse().ok())? };
    let (year, rest) = match tag {
        0x17 if text.len() == 12 => {
            let yy = digits(text.get(..2)?)?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, text.get(2..)?)
        }
        0x18 if text.len() == 14 => (digits(text.get(..4)?)?, text.get(4..)?),
        _ => return None,
    };
    let field = |i: usize| digits(rest.get(i..i + 2)?);
    let (month, day, hour, minute, second) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    // Days from the civil date (Howard Hinnant's algorithm), then seconds since the epoch.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    let secs = u64::try_from(secs).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
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

/// A certificate DNS SAN against a host name, as Envoy's DNS SAN check does: equal ignoring case, or a `*.` wildcard
/// standing for exactly one leftmost label.
fn dns_name_matches(san: &str, name: &str) -> bool {
    if san.eq_ignore_ascii_case(name) {
        return true;
    }
    match (san.strip_prefix("*."), name.split_once('.')) {
        (Some(suffix), Some((label, rest))) => !label.is_empty() && rest.eq_ignore_ascii_case(suffix),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_sans_match_names_as_envoys_auto_san_validation_does() {
        assert!(dns_name_matches("API.example", "api.example"));
        assert!(dns_name_matches("*.example", "api.example"));
        assert!(!dns_name_matches("*.example", "a.b.example"), "a wildcard stands for one label");
        assert!(!dns_name_matches("*.example", "example"));
        assert!(!dns_name_matches("api.example", "web.example"));
    }

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
    fn certificate_info_reads_serial_validity_and_names() {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut params = rcgen::CertificateParams::new(vec!["a.svc".to_string()]).unwrap_or_else(|e| panic!("{e}"));
        params.serial_number = Some(rcgen::SerialNumber::from(0x0102_0304u64));
        params.not_before = rcgen::date_time_ymd(2024, 2, 29);
        params.not_after = rcgen::date_time_ymd(2051, 1, 1);
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        let info = certificate_info(cert.der()).unwrap_or_else(|| panic!("no info"));
        assert_eq!(info.serial, [1, 2, 3, 4]);
        let secs = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).ok();
        assert_eq!(secs(info.not_before), Some(1_709_164_800), "2024-02-29T00:00:00Z (UTCTime)");
        assert_eq!(secs(info.not_after), Some(2_556_144_000), "2051-01-01T00:00:00Z (GeneralizedTime)");
        assert_eq!(info.names, [(true, "a.svc".to_string())]);
        assert!(certificate_info(b"\x30\x03abc").is_none());
    }

    #[test]
    fn upstream_alpn_defaults_to_what_the_cluster_speaks() {
        let ctx = tlspb::UpstreamTlsContext { sni: "backend.local".into(), ..Default::default() };
        let any = Any {
            type_url: format!("type.googleapis.com/{TYPE_UPSTREAM_TLS}"),
            value: prost::Message::encode_to_vec(&ctx),
        };
        let h2 = UpstreamTls::from_any(&any, "t", &["h2"], false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h2.client_config().map(|c| c.alpn_protocols.clone()), Ok(vec![b"h2".to_vec()]));
        let plain = UpstreamTls::from_any(&any, "t", &[], false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plain.client_config().map(|c| c.alpn_protocols.is_empty()), Ok(true));
    }

    /// A fresh self-signed certificate secret named `name`, as SDS would deliver it.
    fn cert_secret(name: &str, version: &str) -> Secret {
        use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let params = rcgen::CertificateParams::new(vec!["a.svc".to_string()]).unwrap_or_else(|e| panic!("{e}"));
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        let ds = |s: String| Some(DataSource { specifier: Some(Specifier::InlineString(s)), ..Default::default() });
        let proto = tlspb::Secret {
            name: name.into(),
            r#type: Some(tlspb::secret::Type::TlsCertificate(tlspb::TlsCertificate {
                certificate_chain: ds(cert.pem()),
                private_key: ds(key.serialize_pem()),
                ..Default::default()
            })),
        };
        Secret::parse(proto, version, 0).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn an_sds_certificate_builds_one_server_config_per_version() {
        use crate::secret::SecretSource;
        let ctx = tlspb::DownstreamTlsContext {
            common_tls_context: Some(tlspb::CommonTlsContext {
                tls_certificate_sds_secret_configs: vec![tlspb::SdsSecretConfig {
                    name: "default".into(),
                    sds_config: Some(envoy_types::pb::envoy::config::core::v3::ConfigSource {
                        config_source_specifier: Some(
                            envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier::Ads(
                                Default::default(),
                            ),
                        ),
                        ..Default::default()
                    }),
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let tls = DownstreamTls::convert(&ctx, "t").unwrap_or_else(|e| panic!("{e}"));
        assert!(tls.server().is_err(), "unbound: no certificate yet");
        let registry = SecretRegistry::default();
        tls.bind(&registry).unwrap_or_else(|e| panic!("{e}"));
        let err = tls.server().err().unwrap_or_default();
        assert!(err.contains("secret 'default' is not ready"), "{err}");

        assert!(registry.set(&SecretSource::Ads, cert_secret("default", "1")));
        let v1 = tls.server().unwrap_or_else(|e| panic!("{e}"));
        let again = tls.server().unwrap_or_else(|e| panic!("{e}"));
        assert!(Arc::ptr_eq(&v1, &again), "one build per version, shared by every handshake");

        assert!(registry.set(&SecretSource::Ads, cert_secret("default", "2")));
        let v2 = tls.server().unwrap_or_else(|e| panic!("{e}"));
        assert!(!Arc::ptr_eq(&v1, &v2), "a new version takes effect for the next handshake");
        assert!(Arc::ptr_eq(&v2, &tls.server().unwrap_or_else(|e| panic!("{e}"))));
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
}

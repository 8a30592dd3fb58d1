//! TLS secrets by name (Envoy's secret manager): the bootstrap's `static_resources.secrets` and the secrets SDS
//! delivers, each parsed once when it arrives into what rustls needs, and kept in one slot per (source, name) that
//! every TLS context referring to it shares.
//!
//! A slot holds an `ArcSwapOption` of the current version. An update swaps it; TLS contexts notice the new version on
//! their next handshake and build their rustls config for it once (see [`crate::tls`]), so rotation never touches a
//! listener, a cluster or an open connection. A secret that fails to parse is refused as a whole and the slot keeps
//! the version it had (Envoy's NACK keeps the previous secret).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tlspb;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::listener::data_source;
use crate::config::{ConfigError, audit_resource, join};

pub const TYPE_SECRET: &str = "envoy.extensions.transport_sockets.tls.v3.Secret";

/// Envoy's default `initial_fetch_timeout` of a config source.
const DEFAULT_INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a referenced secret comes from: an `SdsSecretConfig` without `sds_config` names a static secret, with one
/// an SDS subscription.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SecretSource {
    /// `static_resources.secrets`.
    Static,
    /// SDS over the ADS stream (`sds_config: { ads: {} }`).
    Ads,
    /// SDS over a stream of its own (`SecretDiscoveryService/StreamSecrets`) to this static cluster
    /// (`api_config_source: { api_type: GRPC, grpc_services: [{ envoy_grpc: { cluster_name } }] }`), as Istio's
    /// sidecars get their certificates from pilot-agent on `sds-grpc`.
    Grpc(String),
}

/// A TLS context's reference to a secret (`SdsSecretConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub name: String,
    pub source: SecretSource,
    /// How long a listener or cluster waits for the secret before it starts anyway (`sds_config.
    /// initial_fetch_timeout`, 15 s by default; 0 s, as Istio sends, waits for ever: None).
    pub initial_fetch_timeout: Option<Duration>,
}

impl SecretRef {
    pub fn from_proto(c: &tlspb::SdsSecretConfig, path: &str) -> Result<SecretRef, ConfigError> {
        use core::config_source::ConfigSourceSpecifier;
        if c.name.is_empty() {
            return Err(ConfigError::new(join(path, "name"), "a secret reference needs a name"));
        }
        let Some(cs) = &c.sds_config else {
            return Ok(SecretRef { name: c.name.clone(), source: SecretSource::Static, initial_fetch_timeout: None });
        };
        let spath = join(path, "sds_config");
        let source = match &cs.config_source_specifier {
            Some(ConfigSourceSpecifier::Ads(_)) => SecretSource::Ads,
            // `self` means "where the referring resource came from"; every dynamic resource of this proxy comes over
            // ADS.
            Some(ConfigSourceSpecifier::Self_(_)) => SecretSource::Ads,
            Some(ConfigSourceSpecifier::ApiConfigSource(api)) => {
                SecretSource::Grpc(grpc_cluster(api, &join(&spath, "api_config_source"))?)
            }
            // `path` and `path_config_source`.
            Some(_) => return Err(ConfigError::new(&spath, "file-based SDS is not supported; use ads")),
            // Envoy's subscription factory refuses it too ("Missing config source specifier").
            None => return Err(ConfigError::new(&spath, "missing config source specifier (use ads)")),
        };
        let timeout = match &cs.initial_fetch_timeout {
            Some(d) => crate::config::duration(d, &join(&spath, "initial_fetch_timeout"))?,
            None => DEFAULT_INITIAL_FETCH_TIMEOUT,
        };
        Ok(SecretRef { name: c.name.clone(), source, initial_fetch_timeout: (!timeout.is_zero()).then_some(timeout) })
    }
}

/// The cluster of an SDS `api_config_source`: GRPC (state of the world) through one `envoy_grpc` cluster.
fn grpc_cluster(api: &core::ApiConfigSource, path: &str) -> Result<String, ConfigError> {
    use core::api_config_source::ApiType;
    use core::grpc_service::TargetSpecifier;
    match ApiType::try_from(api.api_type) {
        Ok(ApiType::Grpc) => {}
        Ok(other) => {
            return Err(ConfigError::new(
                join(path, "api_type"),
                format!("{} is not supported for SDS (GRPC is)", other.as_str_name()),
            ));
        }
        Err(_) => return Err(ConfigError::new(join(path, "api_type"), format!("unknown api_type {}", api.api_type))),
    }
    if api.transport_api_version != core::ApiVersion::V3 as i32 && api.transport_api_version != 0 {
        return Err(ConfigError::new(join(path, "transport_api_version"), "only V3 is supported"));
    }
    match api.grpc_services.as_slice() {
        [one] => match &one.target_specifier {
            Some(TargetSpecifier::EnvoyGrpc(e)) if !e.cluster_name.is_empty() => Ok(e.cluster_name.clone()),
            Some(TargetSpecifier::GoogleGrpc(_)) => Err(ConfigError::new(
                join(path, "grpc_services[0].google_grpc"),
                "google_grpc is not supported; use envoy_grpc with a static cluster",
            )),
            _ => Err(ConfigError::new(join(path, "grpc_services[0].envoy_grpc.cluster_name"), "a cluster is required")),
        },
        _ => Err(ConfigError::new(join(path, "grpc_services"), "exactly one gRPC service is supported")),
    }
}

/// A parsed validation context: what a verifier needs.
#[derive(Debug)]
pub struct Validation {
    /// `trusted_ca`, which every validation context of ours needs.
    pub roots: Arc<rustls::RootCertStore>,
    /// The CA certificates as given, for /certs.
    pub ca_certs: Vec<CertificateDer<'static>>,
    pub san: Vec<crate::tls::SanMatcher>,
}

impl Validation {
    pub fn from_proto(v: &tlspb::CertificateValidationContext, path: &str) -> Result<Validation, ConfigError> {
        let (roots, ca_certs) = roots(v.trusted_ca.as_ref(), &join(path, "trusted_ca"))?;
        let mut san = Vec::new();
        for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
            san.push(crate::tls::san_matcher(m, &join(path, &format!("match_typed_subject_alt_names[{i}]")))?);
        }
        san.extend(crate::tls::legacy_san_matchers(v, path)?);
        Ok(Validation { roots: Arc::new(roots), ca_certs, san })
    }
}

/// The trusted CA store of a `trusted_ca` data source, and its certificates.
pub fn roots(
    ca: Option<&core::DataSource>,
    path: &str,
) -> Result<(rustls::RootCertStore, Vec<CertificateDer<'static>>), ConfigError> {
    let ca = data_source(ca, path)?;
    if ca.is_empty() {
        return Err(ConfigError::new(path, "a trusted CA is required"));
    }
    let mut roots = rustls::RootCertStore::empty();
    let mut certs = Vec::new();
    for (i, cert) in CertificateDer::pem_slice_iter(&ca).enumerate() {
        let cert = cert.map_err(|e| ConfigError::new(path, format!("certificate {i}: {e}")))?;
        roots.add(cert.clone()).map_err(|e| ConfigError::new(path, e.to_string()))?;
        certs.push(cert);
    }
    if roots.is_empty() {
        return Err(ConfigError::new(path, "no PEM certificate found"));
    }
    Ok((roots, certs))
}

/// A certificate chain with its private key, checked to belong together.
pub fn certified_key(c: &tlspb::TlsCertificate, path: &str) -> Result<Arc<rustls::sign::CertifiedKey>, ConfigError> {
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
    let provider = rustls::crypto::ring::default_provider();
    let key = rustls::sign::CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| ConfigError::new(join(path, "private_key"), format!("does not fit the certificate: {e}")))?;
    Ok(Arc::new(key))
}

/// One secret as delivered, parsed.
#[derive(Debug)]
pub struct Secret {
    pub name: String,
    /// The version it came in (SotW `version_info`, a delta resource's own version; empty for static secrets).
    pub version: String,
    pub last_updated: SystemTime,
    /// A hash of the resource's bytes: an unchanged resource is not installed again.
    pub hash: u64,
    pub content: SecretContent,
    /// The resource with private keys redacted, for /config_dump and CSDS.
    pub redacted: tlspb::Secret,
}

#[derive(Debug)]
pub enum SecretContent {
    Certificate(Arc<rustls::sign::CertifiedKey>),
    /// Parsed for plain use, and as received for `combined_validation_context`, which merges it into its default.
    Validation {
        parsed: Arc<Validation>,
        proto: Box<tlspb::CertificateValidationContext>,
    },
}

impl Secret {
    /// Validates and parses a secret; errors name the field (`tls_certificate.private_key: ...`).
    pub fn parse(proto: tlspb::Secret, version: &str, hash: u64) -> Result<Secret, ConfigError> {
        use tlspb::secret::Type;
        audit_resource(&proto, TYPE_SECRET)?;
        if proto.name.is_empty() {
            return Err(ConfigError::new("name", "a secret needs a name"));
        }
        let content = match &proto.r#type {
            Some(Type::TlsCertificate(c)) => SecretContent::Certificate(certified_key(c, "tls_certificate")?),
            Some(Type::ValidationContext(v)) => SecretContent::Validation {
                parsed: Arc::new(Validation::from_proto(v, "validation_context")?),
                proto: Box::new(v.clone()),
            },
            _ => {
                return Err(ConfigError::new("", "only tls_certificate and validation_context secrets are supported"));
            }
        };
        Ok(Secret {
            name: proto.name.clone(),
            version: version.to_string(),
            last_updated: SystemTime::now(),
            hash,
            content,
            redacted: redact(proto),
        })
    }

    pub fn certificate(&self) -> Option<&Arc<rustls::sign::CertifiedKey>> {
        match &self.content {
            SecretContent::Certificate(c) => Some(c),
            SecretContent::Validation { .. } => None,
        }
    }

    pub fn validation(&self) -> Option<(&Arc<Validation>, &tlspb::CertificateValidationContext)> {
        match &self.content {
            SecretContent::Validation { parsed, proto } => Some((parsed, proto)),
            SecretContent::Certificate(_) => None,
        }
    }
}

/// Envoy's redaction of a secret for dumps (`MessageUtil::redact` over the `sensitive` fields `private_key` and
/// `password`): every string or bytes value inside becomes `[redacted]`, so a dump shows that a key is configured and
/// how (inline or a file), never the key.
pub fn redact(mut s: tlspb::Secret) -> tlspb::Secret {
    use core::data_source::Specifier;
    const REDACTED: &str = "[redacted]";
    if let Some(tlspb::secret::Type::TlsCertificate(c)) = &mut s.r#type {
        for ds in [c.private_key.as_mut(), c.password.as_mut()].into_iter().flatten() {
            ds.specifier = match ds.specifier.take() {
                Some(Specifier::InlineBytes(_)) => Some(Specifier::InlineBytes(REDACTED.as_bytes().to_vec())),
                Some(Specifier::InlineString(_)) => Some(Specifier::InlineString(REDACTED.into())),
                Some(Specifier::Filename(_)) => Some(Specifier::Filename(REDACTED.into())),
                Some(Specifier::EnvironmentVariable(_)) => Some(Specifier::EnvironmentVariable(REDACTED.into())),
                None => None,
            };
        }
    }
    s
}

/// The current version of one secret, shared by every TLS context that refers to it.
#[derive(Debug)]
pub struct SecretSlot {
    pub name: String,
    pub source: SecretSource,
    current: ArcSwapOption<Secret>,
}

impl SecretSlot {
    pub fn current(&self) -> Option<Arc<Secret>> {
        self.current.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }
}

/// A TLS context's reference, bound to its slot by the manager that applies the listener or cluster (the config
/// conversion has no registry to look it up in).
#[derive(Debug)]
pub struct SecretBinding {
    pub reference: SecretRef,
    /// The field that holds the reference, for errors.
    pub path: String,
    slot: OnceLock<Arc<SecretSlot>>,
}

impl SecretBinding {
    pub fn new(reference: SecretRef, path: String) -> Self {
        SecretBinding { reference, path, slot: OnceLock::new() }
    }

    /// The bound slot; None before the manager bound it.
    pub fn slot(&self) -> Option<&Arc<SecretSlot>> {
        self.slot.get()
    }

    /// The secret in force now, if any.
    pub fn current(&self) -> Option<Arc<Secret>> {
        self.slot.get().and_then(|s| s.current())
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SecretError {
    /// Envoy's wording for a reference to a static secret the bootstrap does not define.
    #[error("{path}: Unknown static secret: {name}")]
    UnknownStatic { path: String, name: String },
}

/// Every secret slot of the process, by source and name. Dynamic slots live while a TLS context holds them
/// ([`SecretRegistry::subscription`] forgets the rest); static ones for the life of the process.
/// Slots by (source, name).
type Slots = HashMap<(SecretSource, String), Arc<SecretSlot>>;

#[derive(Debug, Clone, Default)]
pub struct SecretRegistry {
    slots: Arc<Mutex<Slots>>,
    /// Woken when a dynamic slot is created, so SDS clients subscribe to it without waiting for their next poll.
    created: Arc<tokio::sync::Notify>,
}

impl SecretRegistry {
    /// A registry holding the bootstrap's secrets. Duplicate names are refused as Envoy refuses them.
    pub fn with_static(secrets: &[Arc<Secret>]) -> Result<Self, ConfigError> {
        let registry = SecretRegistry::default();
        {
            let mut slots = registry.slots.lock().unwrap_or_else(|p| p.into_inner());
            for (i, s) in secrets.iter().enumerate() {
                let key = (SecretSource::Static, s.name.clone());
                if slots.contains_key(&key) {
                    return Err(ConfigError::new(
                        format!("static_resources.secrets[{i}]"),
                        format!("Duplicate static secret name {}", s.name),
                    ));
                }
                let slot = SecretSlot {
                    name: s.name.clone(),
                    source: SecretSource::Static,
                    current: ArcSwapOption::from(Some(s.clone())),
                };
                slots.insert(key, Arc::new(slot));
            }
        }
        Ok(registry)
    }

    /// Binds a reference to its slot: a static secret must exist; a dynamic slot is created empty on first use and
    /// filled by SDS. Binding twice is harmless (a config shared by two listener versions).
    pub fn bind(&self, binding: &SecretBinding) -> Result<(), SecretError> {
        if binding.slot.get().is_some() {
            return Ok(());
        }
        let r = &binding.reference;
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let key = (r.source.clone(), r.name.clone());
        let slot = match slots.get(&key) {
            Some(slot) => slot.clone(),
            None if r.source == SecretSource::Static => {
                return Err(SecretError::UnknownStatic { path: binding.path.clone(), name: r.name.clone() });
            }
            None => {
                let slot = Arc::new(SecretSlot {
                    name: r.name.clone(),
                    source: r.source.clone(),
                    current: Default::default(),
                });
                slots.insert(key, slot.clone());
                self.created.notify_waiters();
                slot
            }
        };
        let _ = binding.slot.set(slot);
        Ok(())
    }

    /// Installs a secret delivered by `source`; false when nothing refers to that name (it is dropped, as Envoy
    /// ignores unrequested resources).
    pub fn set(&self, source: &SecretSource, secret: Secret) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = slots.get(&(source.clone(), secret.name.clone())) else { return false };
        slot.current.store(Some(Arc::new(secret)));
        true
    }

    /// Whether `source`'s secret `name` is in force with exactly the content hashed as `hash`.
    pub fn holds(&self, source: &SecretSource, name: &str, hash: u64) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(&(source.clone(), name.to_string())).and_then(|s| s.current()).is_some_and(|s| s.hash == hash)
    }

    /// Drops dynamic slots no TLS context holds any more and returns the names `source` is still asked for: the SDS
    /// subscription.
    pub fn subscription(&self, source: &SecretSource) -> BTreeSet<String> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|(src, _), slot| *src == SecretSource::Static || Arc::strong_count(slot) > 1);
        slots.keys().filter(|(src, _)| src == source).map(|(_, name)| name.clone()).collect()
    }

    /// Every dynamic secret name asked for, whatever its source: what CSDS reports as subscribed.
    pub fn dynamic_names(&self) -> BTreeSet<String> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.keys().filter(|(src, _)| *src != SecretSource::Static).map(|(_, name)| name.clone()).collect()
    }

    /// The clusters of the gRPC SDS sources some TLS context refers to: one SDS stream each.
    pub fn grpc_sources(&self) -> BTreeSet<String> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .keys()
            .filter_map(|(src, _)| match src {
                SecretSource::Grpc(cluster) => Some(cluster.clone()),
                _ => None,
            })
            .collect()
    }

    /// Resolves when a slot was created since the last call (a new name to subscribe, maybe a new source).
    pub async fn changed(&self) {
        self.created.notified().await;
    }

    /// Every slot, static ones first, each group by name, for dumps.
    pub fn all(&self) -> Vec<Arc<SecretSlot>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<Arc<SecretSlot>> = slots.values().cloned().collect();
        all.sort_by(|a, b| (&a.source, &a.name).cmp(&(&b.source, &b.name)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let params = rcgen::CertificateParams::new(vec!["a.svc".to_string()]).unwrap_or_else(|e| panic!("{e}"));
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        (cert.pem(), key.serialize_pem())
    }

    fn cert_secret(name: &str, cert: &str, key: &str) -> tlspb::Secret {
        tlspb::Secret {
            name: name.into(),
            r#type: Some(tlspb::secret::Type::TlsCertificate(tlspb::TlsCertificate {
                certificate_chain: Some(core::DataSource {
                    specifier: Some(core::data_source::Specifier::InlineString(cert.into())),
                    ..Default::default()
                }),
                private_key: Some(core::DataSource {
                    specifier: Some(core::data_source::Specifier::InlineBytes(key.as_bytes().to_vec())),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_secret_whose_key_does_not_fit_its_certificate_is_refused_at_the_field() {
        let (cert, _) = pem_pair();
        let (_, other_key) = pem_pair();
        let err = Secret::parse(cert_secret("default", &cert, &other_key), "1", 0).err().map(|e| e.path);
        assert_eq!(err.as_deref(), Some("tls_certificate.private_key"));
        let err = Secret::parse(cert_secret("default", "garbage", &other_key), "1", 0).err().map(|e| e.path);
        assert_eq!(err.as_deref(), Some("tls_certificate.certificate_chain"));
    }

    #[test]
    fn private_keys_are_redacted_as_envoy_does() {
        let (cert, key) = pem_pair();
        let s = Secret::parse(cert_secret("default", &cert, &key), "1", 0).unwrap_or_else(|e| panic!("{e}"));
        let Some(tlspb::secret::Type::TlsCertificate(c)) = &s.redacted.r#type else { panic!("not a certificate") };
        assert_eq!(
            c.private_key.as_ref().and_then(|d| d.specifier.clone()),
            Some(core::data_source::Specifier::InlineBytes(b"[redacted]".to_vec()))
        );
        let chain = c.certificate_chain.as_ref().and_then(|d| d.specifier.clone());
        assert_eq!(chain, Some(core::data_source::Specifier::InlineString(cert)), "certificates are not secret");
    }

    #[test]
    fn dynamic_slots_live_while_referenced_and_static_ones_must_exist() {
        let registry = SecretRegistry::default();
        let r = |name: &str, source| SecretRef { name: name.into(), source, initial_fetch_timeout: None };
        let b = SecretBinding::new(r("default", SecretSource::Ads), "p".into());
        assert!(registry.bind(&b).is_ok());
        assert_eq!(registry.subscription(&SecretSource::Ads), BTreeSet::from(["default".to_string()]));
        let (cert, key) = pem_pair();
        let parsed = Secret::parse(cert_secret("default", &cert, &key), "7", 0).unwrap_or_else(|e| panic!("{e}"));
        assert!(registry.set(&SecretSource::Ads, parsed));
        assert_eq!(b.current().map(|s| s.version.clone()).as_deref(), Some("7"));
        drop(b);
        assert!(registry.subscription(&SecretSource::Ads).is_empty(), "nothing refers to it any more");

        let missing = SecretBinding::new(r("nope", SecretSource::Static), "x.name".into());
        assert_eq!(
            registry.bind(&missing).map_err(|e| e.to_string()),
            Err("x.name: Unknown static secret: nope".into())
        );
    }
}

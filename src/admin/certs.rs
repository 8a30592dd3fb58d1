//! `/certs`: the certificates the proxy's TLS contexts use now (Envoy's `envoy.admin.v3.Certificates`), one entry per
//! context (listener filter chains, then clusters) with its CA and its own certificate: where each came from, serial
//! number, subject alternative names, validity and days until expiration. Secrets show their version in force, so a
//! rotation is visible here at once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use envoy_types::pb::envoy::admin::v3 as admin;
use rustls::pki_types::CertificateDer;

use super::Context;
use super::json::timestamp;
use crate::tls::InUse;

pub fn certificates(ctx: &Context) -> admin::Certificates {
    let mut in_use: Vec<InUse> = Vec::new();
    // A chain kept by several listener versions is one context: count it once.
    let mut seen = HashSet::new();
    for l in ctx.listener_manager().active_listeners() {
        for tls in l.chains().all().filter_map(|c| c.config.tls.as_ref()) {
            if seen.insert(Arc::as_ptr(tls) as usize) {
                in_use.push(tls.in_use());
            }
        }
    }
    let clusters = {
        let cm = ctx.cluster_manager();
        cm.names().iter().filter_map(|n| cm.get(n)).collect::<Vec<_>>()
    };
    for c in clusters {
        for tls in c.config.tls_contexts() {
            in_use.push(tls.in_use());
        }
    }
    let now = SystemTime::now();
    let certificates = in_use
        .into_iter()
        .filter(|(cert, ca)| cert.is_some() || ca.is_some())
        .map(|(cert, ca)| admin::Certificate {
            // Envoy shows the first certificate of the trusted CA bundle and the leaf of the chain.
            ca_cert: ca.iter().filter_map(|v| details(v.ca_certs.first()?, &v.ca_path, now)).collect(),
            cert_chain: cert.iter().filter_map(|k| details(k.key.cert.first()?, &k.path, now)).collect(),
        })
        .collect();
    admin::Certificates { certificates }
}

fn details(der: &CertificateDer<'_>, path: &str, now: SystemTime) -> Option<admin::CertificateDetails> {
    use admin::subject_alternate_name::Name;
    let info = crate::tls::certificate_info(der.as_ref())?;
    let days = info.not_after.duration_since(now).map_or(0, |d| d.as_secs() / 86_400);
    Some(admin::CertificateDetails {
        path: path.to_string(),
        serial_number: info.serial.iter().map(|b| format!("{b:02x}")).collect(),
        subject_alt_names: info
            .names
            .into_iter()
            .map(|(dns, name)| admin::SubjectAlternateName {
                name: Some(if dns { Name::Dns(name) } else { Name::Uri(name) }),
            })
            .collect(),
        days_until_expiration: days,
        valid_from: Some(timestamp(info.not_before)),
        expiration_time: Some(timestamp(info.not_after)),
        ocsp_details: None,
    })
}

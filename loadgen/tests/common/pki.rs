//! Test certificates written as PEM files: a CA, a server certificate for 127.0.0.1
//! signed by it, and a client certificate (for mutual TLS) signed by it too.

use std::path::{Path, PathBuf};

/// A CA and a server certificate for 127.0.0.1 signed by it, written as PEM files into
/// `dir`: (ca, cert, key).
pub fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, files) = write_ca_and_server(dir);
    drop(ca);
    files
}

/// [`certificates`], and a client certificate with subject CN `cn` signed by the same
/// CA: ((ca, cert, key), (client cert, client key)).
pub fn with_client(dir: &Path, cn: &str) -> ((PathBuf, PathBuf, PathBuf), (PathBuf, PathBuf)) {
    let ((ca, ca_key), files) = write_ca_and_server(dir);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let client = (dir.join("client.pem"), dir.join("client.key"));
    std::fs::write(&client.0, cert.pem()).unwrap();
    std::fs::write(&client.1, key.serialize_pem()).unwrap();
    (files, client)
}

type Ca = (rcgen::Certificate, rcgen::KeyPair);

fn write_ca_and_server(dir: &Path) -> (Ca, (PathBuf, PathBuf, PathBuf)) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let files = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&files.0, ca.pem()).unwrap();
    std::fs::write(&files.1, cert.pem()).unwrap();
    std::fs::write(&files.2, key.serialize_pem()).unwrap();
    ((ca, ca_key), files)
}

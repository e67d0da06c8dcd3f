//! A throwaway certificate authority, made by the test: a CA, a server certificate for
//! `localhost` and 127.0.0.1 and a client certificate, each as PEM files in a temporary
//! directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A new CA, and a server and a client certificate it signed.
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = authority("auth-sidecar test CA");
        write(dir.path(), "ca.crt", &ca.pem());
        for (name, sans) in [
            (
                "server",
                vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            ),
            ("client", vec!["auth-sidecar".to_owned()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.signed_by(&key, &ca).unwrap();
            write(dir.path(), &format!("{name}.crt"), &cert.pem());
            write(dir.path(), &format!("{name}.key"), &key.serialize_pem());
        }
        Pki { dir }
    }

    /// `ca.crt`, `server.crt`, `server.key`, `client.crt` or `client.key`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    /// Another CA's certificate: one that signed none of these.
    pub fn stranger_ca(&self) -> PathBuf {
        let path = self.path("stranger-ca.crt");
        write(
            self.dir.path(),
            "stranger-ca.crt",
            &authority("a stranger").pem(),
        );
        path
    }
}

fn authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

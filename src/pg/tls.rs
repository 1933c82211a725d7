//! TLS to PostgreSQL, with libpq's `sslmode` meanings, on rustls.
//!
//! The driver only knows "no TLS", "TLS if offered" and "TLS or nothing"; what a certificate must
//! prove is decided here, by the verifier each mode gets:
//! - `prefer` and `require` encrypt without checking who answers (as libpq does), except that
//!   `require` with a CA file configured checks the chain like `verify-ca` (libpq's rule too);
//! - `verify-ca` checks that a trusted CA signed the certificate, whatever name it carries;
//! - `verify-full` also checks that the certificate names the host connected to.
//!
//! Trusted CAs come from `sink.postgres.ca_file` (PEM), else from the system's store. The handshake
//! signatures are always verified, so even an unchecked certificate proves that the peer holds its
//! key. The provider is named explicitly (aws-lc-rs, which the AWS SDK already links) so that no
//! process-wide default has to be installed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::conn_string::SslMode;

/// TLS cannot be set up as configured.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the CA file {path}")]
    ReadCaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA file {path} is not PEM certificates")]
    ParseCaFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the CA file {path} holds no usable certificate")]
    EmptyCaFile { path: PathBuf },
    #[error(
        "sslmode={0} needs trusted CAs: set `sink.postgres.ca_file` (or SLUICE_DATABASE_CA_FILE); the system has none"
    )]
    NoSystemRoots(SslMode),
    #[error("TLS setup")]
    Rustls(#[from] rustls::Error),
    #[error("TLS setup")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// The rustls client configuration for `mode`, or `None` when the connection is plain.
pub fn client_config(
    mode: SslMode,
    ca_file: Option<&Path>,
) -> Result<Option<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, ca_file) {
        (SslMode::Disable, _) => return Ok(None),
        (SslMode::Prefer, _) | (SslMode::Require, None) => {
            Arc::new(AnyCertificate(provider.clone()))
        }
        (SslMode::Require | SslMode::VerifyCa, _) => Arc::new(TrustedCaAnyName(trusted_chain(
            mode,
            ca_file,
            provider.clone(),
        )?)),
        (SslMode::VerifyFull, _) => trusted_chain(mode, ca_file, provider.clone())?,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(config))
}

/// Reads a PEM file of CA certificates; used at config load too, so a bad file fails at start.
pub fn load_ca_file(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::ReadCaFile {
        path: path.to_owned(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|source| TlsError::ParseCaFile {
            path: path.to_owned(),
            source,
        })?;
        // A certificate webpki cannot use as an anchor is skipped; none at all is an error below.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(TlsError::EmptyCaFile {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

fn system_roots(mode: SslMode) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) =
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if added == 0 {
        return Err(TlsError::NoSystemRoots(mode));
    }
    Ok(roots)
}

/// webpki's verifier: chain to a trusted root, validity dates, and the server's name.
fn trusted_chain(
    mode: SslMode,
    ca_file: Option<&Path>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    let roots = match ca_file {
        Some(path) => load_ca_file(path)?,
        None => system_roots(mode)?,
    };
    Ok(WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?)
}

/// `prefer`, `require` without a CA file: encrypted, the certificate taken as presented.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: webpki's checks, except that the certificate need not name the host. webpki checks
/// the chain before the name, so a name mismatch means everything else passed.
#[derive(Debug)]
struct TrustedCaAnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for TrustedCaAnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

//! `wss://`: TLS 1.2 and 1.3, with rustls for the handshake and ring's AEADs for the records.
//!
//! rustls (ring provider) runs each connection's handshake through its unbuffered API over the
//! connection's own buffers: certificate check, key exchange, session resumption. Once the handshake is
//! done it hands over the traffic secrets (`dangerous_into_kernel_connection`, its kTLS entry point) and
//! the bench seals and opens the records itself with `ring::aead`, in place in its read buffer and its
//! send buffer. rustls 0.23 allocates a buffer for every record it encrypts or decrypts (buffered and
//! unbuffered API alike), which the bench's per-message path must not do; so, as with plain `ws://`, no
//! allocation per message. What rustls still does after the handshake, through its
//! [`KernelConnection`]: store the session tickets a TLS 1.3 server sends after the handshake (in the
//! client config's resumption cache, for the next connections), and derive new keys on a TLS 1.3
//! `KeyUpdate`.
//!
//! The server's certificate is checked against `--ca-file` (PEM), or the system's store; or not at all
//! with `--insecure-skip-verify` (benchmarking only: the handshake signature is still verified, so the
//! handshake costs what a checked one costs but for the chain). SNI and the name checked come from the URL
//! host, or `--sni`.

use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use ring::aead;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConnectionData, Resumption, UnbufferedClientConnection};
use rustls::crypto::CryptoProvider;
use rustls::kernel::KernelConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{
    CertificateError, ClientConfig, ConnectionTrafficSecrets, DigitallySignedStruct, HandshakeKind, ProtocolVersion,
    RootCertStore, SignatureScheme, SupportedCipherSuite,
};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::poll;
use crate::sys::thread_cpu_ns;

/// Largest plaintext of a record (2^14).
const MAX_FRAGMENT: usize = 16 * 1024;
/// Largest ciphertext of a record accepted (TLS 1.2 allows 2^14 + 2048, TLS 1.3 2^14 + 256).
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 2048;
/// Room a reader must leave beyond its read size: one partial record carried over from the last read.
pub const READ_ROOM: usize = 5 + MAX_CIPHERTEXT;
/// Records sealed before the keys are renewed (TLS 1.3) or the connection given up (TLS 1.2), below the
/// cipher suite's confidentiality limit.
const LIMIT_MARGIN: u64 = 1 << 16;

const CT_CCS: u8 = 20;
const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_APP: u8 = 23;
const HS_HELLO_REQUEST: u8 = 0;
const HS_NEW_SESSION_TICKET: u8 = 4;
const HS_KEY_UPDATE: u8 = 24;

/// TLS versions offered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsVersion {
    /// TLS 1.3 and 1.2; the server chooses.
    #[default]
    Auto,
    /// TLS 1.2 only.
    #[value(name = "1.2")]
    V12,
    /// TLS 1.3 only.
    #[value(name = "1.3")]
    V13,
}

/// The TLS options of a run.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// PEM file of the certificates to trust instead of the system store.
    pub ca_file: Option<std::path::PathBuf>,
    /// Accept any certificate (benchmarking only).
    pub insecure_skip_verify: bool,
    /// Server name for SNI and the certificate check, instead of the URL host.
    pub sni: Option<String>,
    /// Versions offered.
    pub version: TlsVersion,
    /// No session resumption.
    pub no_resumption: bool,
}

/// TLS settings of a `wss://` run, shared by every connection of a process.
#[derive(Clone, Debug)]
pub struct TlsPlan {
    /// The client configuration (its session cache is shared by the process's threads).
    pub config: Arc<ClientConfig>,
    /// Name sent as SNI and checked against the certificate (an IP address: checked, no SNI).
    pub server_name: ServerName<'static>,
    /// How the certificate is checked: `ca-file`, `system` or `none`.
    pub verify: &'static str,
    /// Whether sessions are resumed.
    pub resumption: bool,
}

impl TlsPlan {
    /// Builds the client configuration for `host` (the URL's, without port or brackets).
    pub fn new(host: &str, o: &TlsOptions) -> Result<TlsPlan, Error> {
        let name = o.sni.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|e| Error::Config(format!("TLS server name {name:?}: {e} (give a DNS name with --sni)")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&'static rustls::SupportedProtocolVersion] = match o.version {
            TlsVersion::Auto => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V12 => &[&rustls::version::TLS12],
            TlsVersion::V13 => &[&rustls::version::TLS13],
        };
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)
            .map_err(|e| Error::Config(format!("TLS configuration: {e}")))?;
        let (mut config, verify) = if o.insecure_skip_verify {
            let config = builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            (config, "none")
        } else {
            let (roots, verify) = match &o.ca_file {
                Some(path) => (ca_file_roots(path)?, "ca-file"),
                None => (system_roots()?, "system"),
            };
            (builder.with_root_certificates(roots).with_no_client_auth(), verify)
        };
        // The records are the bench's own after the handshake (see the module docs).
        config.enable_secret_extraction = true;
        if o.no_resumption {
            config.resumption = Resumption::disabled();
        }
        Ok(TlsPlan { config: Arc::new(config), server_name, verify, resumption: !o.no_resumption })
    }
}

fn ca_file_roots(path: &Path) -> Result<RootCertStore, Error> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::Config(format!("--ca-file {shown}: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("--ca-file {shown}: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Config(format!("--ca-file {shown}: no CERTIFICATE in it")));
    }
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| Error::Config(format!("--ca-file {shown}: certificate {}: {e}", i + 1)))?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, Error> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(Error::Config(format!(
            "wss://: no CA certificate in the system store{}: give --ca-file PEM, or --insecure-skip-verify \
             (benchmarking only)",
            found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default()
        )));
    }
    Ok(roots)
}

/// `--insecure-skip-verify`: any certificate chain and name, but the handshake signature is checked (so
/// the handshake costs what a verified one does, less the chain).
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What a completed handshake negotiated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsInfo {
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: String,
    /// The cipher suite, as IANA names it (`TLS13_AES_128_GCM_SHA256`, ...).
    pub cipher_suite: String,
    /// The key exchange group (`X25519`, `secp256r1`, ...).
    pub kx_group: Option<String>,
}

/// A handshake that completed.
#[derive(Clone, Debug)]
pub struct Established {
    /// What it negotiated.
    pub info: TlsInfo,
    /// True when a session was resumed.
    pub resumed: bool,
    /// Client CPU spent in the handshake (thread CPU time in rustls), ns.
    pub cpu_ns: u64,
    /// When the handshake started (TCP connected), ns.
    pub started: u64,
}

/// A failed handshake or record: the report's error kind and rustls's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Short kind for the error counts (`tls_unknown_issuer`, `tls_alert_handshake_failure`, ...).
    pub kind: String,
    /// The full message, for the report's warning.
    pub message: String,
}

impl Failure {
    fn new(kind: &str, message: impl Into<String>) -> Self {
        Self { kind: kind.into(), message: message.into() }
    }

    fn from_rustls(e: &rustls::Error) -> Self {
        use rustls::Error as E;
        let kind = match e {
            E::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => "tls_unknown_issuer".to_string(),
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    "tls_bad_certificate_name".into()
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => "tls_certificate_expired".into(),
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "tls_certificate_not_valid_yet".into()
                }
                _ => "tls_bad_certificate".into(),
            },
            E::AlertReceived(a) => format!("tls_alert_{}", snake(&format!("{a:?}"))),
            E::PeerIncompatible(_) => "tls_incompatible".into(),
            E::InvalidMessage(_) | E::PeerMisbehaved(_) | E::InappropriateMessage { .. } => "tls_protocol".into(),
            E::DecryptError => "tls_decrypt_error".into(),
            _ => "tls_error".into(),
        };
        Self { kind, message: e.to_string() }
    }

    /// True for a certificate the bench did not trust.
    pub fn is_certificate(&self) -> bool {
        is_certificate_kind(&self.kind)
    }
}

/// True for the error kinds of a server certificate the bench did not accept.
pub fn is_certificate_kind(kind: &str) -> bool {
    kind.starts_with("tls_unknown_issuer")
        || kind.starts_with("tls_bad_certificate")
        || kind.starts_with("tls_certificate")
}

/// `HandshakeFailure` → `handshake_failure`.
fn snake(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 4);
    for (i, ch) in s.chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                o.push('_');
            }
            o.push(ch.to_ascii_lowercase());
        } else if ch.is_ascii_alphanumeric() {
            o.push(ch);
        }
    }
    o
}

fn version_name(v: ProtocolVersion) -> String {
    match v {
        ProtocolVersion::TLSv1_3 => "TLSv1.3".into(),
        ProtocolVersion::TLSv1_2 => "TLSv1.2".into(),
        v => format!("{v:?}"),
    }
}

/// One TLS connection: the rustls handshake, then the bench's own records.
pub struct TlsConn {
    /// The handshake in progress (`None` once done).
    hs: Option<UnbufferedClientConnection>,
    /// Record protection after the handshake.
    rec: Option<Records>,
    /// Received ciphertext not processed yet: during the handshake everything received, later at most one
    /// partial record.
    inb: Vec<u8>,
    /// Ciphertext for the socket, sent from `pos`.
    pub out: Vec<u8>,
    /// How much of `out` the socket took.
    pub pos: usize,
    /// Set by a `close_notify` or another alert: the next read reports it (after the records before it).
    closed: Option<Failure>,
    started: u64,
    cpu_ns: u64,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("handshaking", &self.hs.is_some())
            .field("inb", &self.inb.len())
            .field("out", &(self.out.len() - self.pos))
            .finish_non_exhaustive()
    }
}

impl TlsConn {
    /// Starts a client handshake (`now`: when TCP connected); the ClientHello is in `out` after the first
    /// [`TlsConn::handshake`].
    pub fn new(plan: &TlsPlan, now: u64) -> Result<Box<TlsConn>, Failure> {
        let hs = UnbufferedClientConnection::new(Arc::clone(&plan.config), plan.server_name.clone())
            .map_err(|e| Failure::from_rustls(&e))?;
        Ok(Box::new(TlsConn {
            hs: Some(hs),
            rec: None,
            inb: Vec::new(),
            out: Vec::new(),
            pos: 0,
            closed: None,
            started: now,
            cpu_ns: 0,
        }))
    }

    /// True while the handshake runs.
    pub fn handshaking(&self) -> bool {
        self.hs.is_some()
    }

    /// Unsent ciphertext bytes.
    #[inline]
    pub fn unsent(&self) -> usize {
        self.out.len() - self.pos
    }

    /// Handshake: takes received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.inb.extend_from_slice(data);
    }

    /// Runs the handshake on what was received; what rustls sends goes to `out`. `Ok(None)` while it
    /// waits for the server, `Ok(Some(_))` once done (records are the bench's from then on).
    pub fn handshake(&mut self) -> Result<Option<Established>, Failure> {
        let cpu0 = thread_cpu_ns();
        let r = self.drive();
        self.cpu_ns += thread_cpu_ns().saturating_sub(cpu0);
        let r = r?;
        Ok(r.map(|(info, resumed)| Established { info, resumed, cpu_ns: self.cpu_ns, started: self.started }))
    }

    fn drive(&mut self) -> Result<Option<(TlsInfo, bool)>, Failure> {
        enum Next {
            Again,
            Blocked,
            Done,
        }
        let Some(conn) = self.hs.as_mut() else { return Err(Failure::new("tls_error", "handshake already done")) };
        loop {
            let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut self.inb);
            let next = match state {
                Err(e) => Err(Failure::from_rustls(&e)),
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    let at = self.out.len();
                    let mut need = 4096;
                    loop {
                        self.out.resize(at + need, 0);
                        match enc.encode(&mut self.out[at..]) {
                            Ok(n) => {
                                self.out.truncate(at + n);
                                break Ok(Next::Again);
                            }
                            Err(EncodeError::InsufficientSize(s)) => need = s.required_size,
                            Err(EncodeError::AlreadyEncoded) => {
                                self.out.truncate(at);
                                break Ok(Next::Again);
                            }
                        }
                    }
                }
                // Queued in `out`, which the socket gets in order: as good as sent.
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    Ok(Next::Again)
                }
                Ok(ConnectionState::BlockedHandshake) => Ok(Next::Blocked),
                Ok(ConnectionState::WriteTraffic(_)) => Ok(Next::Done),
                Ok(ConnectionState::ReadTraffic(_)) => {
                    Err(Failure::new("tls_protocol", "application data before the request was sent"))
                }
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                    Err(Failure::new("tls_eof", "the server closed the connection during the TLS handshake"))
                }
                Ok(other) => Err(Failure::new("tls_protocol", format!("unexpected TLS state {other:?}"))),
            };
            self.inb.drain(..discard);
            match next? {
                Next::Again => continue,
                Next::Blocked => return Ok(None),
                Next::Done => break,
            }
        }
        let Some(conn) = self.hs.take() else { return Err(Failure::new("tls_error", "no handshake")) };
        let info = TlsInfo {
            version: conn.protocol_version().map(version_name).unwrap_or_default(),
            cipher_suite: conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default(),
            kx_group: conn.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())),
        };
        let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(|e| Failure::from_rustls(&e))?;
        self.rec = Some(Records::new(secrets.tx, secrets.rx, kernel)?);
        // From now on `inb` carries at most a partial record: give back the handshake flight's room.
        self.inb.shrink_to(self.inb.len().max(512));
        Ok(Some((info, resumed)))
    }

    /// Seals `plain` (application data) into records appended to `out`. Nothing before the handshake is
    /// done.
    #[inline]
    pub fn seal(&mut self, plain: &[u8]) -> Result<(), Failure> {
        let Some(rec) = self.rec.as_mut() else { return Ok(()) };
        for chunk in plain.chunks(MAX_FRAGMENT) {
            rec.seal(&mut self.out, CT_APP, chunk)?;
        }
        Ok(())
    }

    /// Moves the sent part out of `out` (all of it, or a large sent prefix).
    #[inline]
    pub fn compact(&mut self) {
        if self.pos == self.out.len() {
            self.out.clear();
            self.pos = 0;
        } else if self.pos > (1 << 20) {
            self.out.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// One `read` of up to `want` bytes after the carried partial record, then opens every complete record:
    /// their application data ends up contiguous at the front of `buf`, which must hold `want` +
    /// [`READ_ROOM`] bytes. `Ok(None)`: nothing to read (`EAGAIN`). `Ok(Some((n, more)))`: `n` bytes of
    /// application data (possibly 0: a partial record, a session ticket), `more` when the socket may have
    /// more. After the handshake only.
    #[inline]
    pub fn read(&mut self, fd: RawFd, buf: &mut [u8], want: usize) -> Result<Option<(usize, bool)>, Failure> {
        if let Some(f) = &self.closed {
            return Err(f.clone());
        }
        let Some(rec) = self.rec.as_mut() else { return Err(Failure::new("tls_error", "read before the handshake")) };
        let carry = self.inb.len();
        buf[..carry].copy_from_slice(&self.inb);
        let n = match poll::read(fd, &mut buf[carry..carry + want]) {
            Ok(0) => return Err(Failure::new("eof", "end of stream")),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(Failure::new(&poll::error_kind(&e), e.to_string())),
        };
        let total = carry + n;
        let (plain, used) = match rec.open_all(&mut buf[..total], &mut self.out) {
            Ok(r) => r,
            Err(Stopped { plain, failure }) => {
                // Deliver what came before the alert; the next read reports it.
                self.closed = Some(failure);
                self.inb.clear();
                return Ok(Some((plain, true)));
            }
        };
        self.inb.clear();
        self.inb.extend_from_slice(&buf[used..total]);
        Ok(Some((plain, n == want)))
    }
}

/// Record processing stopped at an alert (or a bad record): the application data before it, and why.
struct Stopped {
    plain: usize,
    failure: Failure,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// TLS 1.3: nonce = iv ^ seq, the header is the AAD, the real content type inside.
    Tls13,
    /// TLS 1.2 AES-GCM: an 8-byte explicit nonce after the header.
    Tls12Gcm,
    /// TLS 1.2 ChaCha20-Poly1305: nonce = iv ^ seq.
    Tls12Chacha,
}

/// One direction's key.
struct Keys {
    key: aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<(Self, bool), Failure> {
        let (alg, key, iv, chacha) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv, false),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv, false),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv, true),
            _ => {
                return Err(Failure::new(
                    "tls_incompatible",
                    "the negotiated cipher is not AES-GCM or ChaCha20-Poly1305",
                ))
            }
        };
        let key = aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| Failure::new("tls_error", "bad traffic key length"))?;
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| Failure::new("tls_error", "bad traffic IV length"))?;
        Ok((Keys { key: aead::LessSafeKey::new(key), iv, seq }, chacha))
    }

    /// `iv` xor the sequence number (right-aligned, big-endian).
    #[inline]
    fn nonce(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }
}

/// TLS 1.2 additional data: sequence, type, version, plaintext length.
#[inline]
fn tls12_aad(seq: u64, typ: u8, ver: [u8; 2], len: usize) -> [u8; 13] {
    let mut a = [0u8; 13];
    a[..8].copy_from_slice(&seq.to_be_bytes());
    a[8] = typ;
    a[9..11].copy_from_slice(&ver);
    a[11..].copy_from_slice(&(len as u16).to_be_bytes());
    a
}

/// Record protection after the handshake.
struct Records {
    framing: Framing,
    tx: Keys,
    rx: Keys,
    /// Records sealed with one key before it must be renewed.
    limit: u64,
    /// rustls's side: new keys, session tickets (`None` only in unit tests).
    kernel: Option<KernelConnection<ClientConnectionData>>,
    /// Post-handshake handshake messages not complete yet.
    hs_msgs: Vec<u8>,
}

impl Records {
    fn new(
        tx: (u64, ConnectionTrafficSecrets),
        rx: (u64, ConnectionTrafficSecrets),
        kernel: KernelConnection<ClientConnectionData>,
    ) -> Result<Self, Failure> {
        let (tx, chacha) = Keys::new(tx)?;
        let (rx, _) = Keys::new(rx)?;
        let framing = match (kernel.protocol_version(), chacha) {
            (ProtocolVersion::TLSv1_3, _) => Framing::Tls13,
            (_, true) => Framing::Tls12Chacha,
            (_, false) => Framing::Tls12Gcm,
        };
        let limit = match kernel.negotiated_cipher_suite() {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        let limit = limit.saturating_sub(LIMIT_MARGIN);
        Ok(Records { framing, tx, rx, limit, kernel: Some(kernel), hs_msgs: Vec::new() })
    }

    fn kernel(&mut self) -> Result<&mut KernelConnection<ClientConnectionData>, Failure> {
        self.kernel.as_mut().ok_or_else(|| Failure::new("tls_error", "no key schedule"))
    }

    /// Seals one record of content type `typ` (at most [`MAX_FRAGMENT`] bytes) onto `out`.
    #[inline]
    fn seal(&mut self, out: &mut Vec<u8>, typ: u8, data: &[u8]) -> Result<(), Failure> {
        if self.tx.seq >= self.limit {
            if self.framing != Framing::Tls13 {
                return Err(Failure::new("tls_key_limit", "TLS 1.2 connection reached its cipher's record limit"));
            }
            // Renew our keys: announce it under the old key, then switch.
            self.seal_raw(out, CT_HANDSHAKE, &[HS_KEY_UPDATE, 0, 0, 1, 0])?;
            self.tx = self.next_tx()?;
        }
        self.seal_raw(out, typ, data)
    }

    fn next_tx(&mut self) -> Result<Keys, Failure> {
        let s = self.kernel()?.update_tx_secret().map_err(|e| Failure::from_rustls(&e))?;
        Ok(Keys::new(s)?.0)
    }

    #[inline]
    fn seal_raw(&mut self, out: &mut Vec<u8>, typ: u8, data: &[u8]) -> Result<(), Failure> {
        let tag_len = self.tx.key.algorithm().tag_len();
        let nonce = self.tx.nonce();
        let at = out.len();
        let tag = match self.framing {
            Framing::Tls13 => {
                let len = data.len() + 1 + tag_len;
                let head = [CT_APP, 3, 3, (len >> 8) as u8, len as u8];
                out.reserve(5 + len);
                out.extend_from_slice(&head);
                out.extend_from_slice(data);
                out.push(typ);
                self.tx.key.seal_in_place_separate_tag(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aead::Aad::from(head),
                    &mut out[at + 5..],
                )
            }
            Framing::Tls12Gcm | Framing::Tls12Chacha => {
                let explicit = if self.framing == Framing::Tls12Gcm { 8 } else { 0 };
                let len = explicit + data.len() + tag_len;
                out.reserve(5 + len);
                out.extend_from_slice(&[typ, 3, 3, (len >> 8) as u8, len as u8]);
                // AES-GCM: the explicit nonce is the nonce's last 8 bytes (as rustls does).
                out.extend_from_slice(&nonce[12 - explicit..]);
                out.extend_from_slice(data);
                let aad = tls12_aad(self.tx.seq, typ, [3, 3], data.len());
                self.tx.key.seal_in_place_separate_tag(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aead::Aad::from(aad),
                    &mut out[at + 5 + explicit..],
                )
            }
        };
        let tag = tag.map_err(|_| Failure::new("tls_error", "sealing a record failed"))?;
        out.extend_from_slice(tag.as_ref());
        self.tx.seq += 1;
        Ok(())
    }

    /// Opens the complete records at the front of `buf`, moving their application data to its front;
    /// returns (application data bytes, bytes of records used). The rest of `buf` is a partial record.
    #[inline]
    fn open_all(&mut self, buf: &mut [u8], out: &mut Vec<u8>) -> Result<(usize, usize), Stopped> {
        let (mut r, mut w) = (0usize, 0usize);
        while buf.len() - r >= 5 {
            let head = [buf[r], buf[r + 1], buf[r + 2], buf[r + 3], buf[r + 4]];
            let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
            if len > MAX_CIPHERTEXT {
                return Err(Stopped { plain: w, failure: Failure::new("tls_protocol", "oversized record") });
            }
            if buf.len() - r - 5 < len {
                break;
            }
            let end = r + 5 + len;
            let (typ, n) = match self.open_one(head, buf, r, w, end) {
                Ok(v) => v,
                Err(failure) => return Err(Stopped { plain: w, failure }),
            };
            r = end;
            let res = match typ {
                CT_APP => {
                    w += n;
                    Ok(())
                }
                CT_HANDSHAKE => self.on_handshake(&buf[w..w + n], out),
                CT_ALERT => Err(alert(&buf[w..w + n])),
                // A TLS 1.3 compatibility ChangeCipherSpec: nothing to do.
                CT_CCS => Ok(()),
                t => Err(Failure::new("tls_protocol", format!("unexpected record type {t}"))),
            };
            if let Err(failure) = res {
                return Err(Stopped { plain: w, failure });
            }
        }
        Ok((w, r))
    }

    /// Opens the record `buf[r..end]` (header included) and puts its content at `buf[w..]` (`w` ≤ `r`);
    /// returns its content type and length.
    #[inline]
    fn open_one(
        &mut self,
        head: [u8; 5],
        buf: &mut [u8],
        r: usize,
        w: usize,
        end: usize,
    ) -> Result<(u8, usize), Failure> {
        let bad = || Failure::new("tls_decrypt_error", "a record failed to decrypt");
        let tag_len = self.rx.key.algorithm().tag_len();
        let len = end - r - 5;
        match self.framing {
            Framing::Tls13 => {
                if head[0] == CT_CCS {
                    return Ok((CT_CCS, 0));
                }
                if head[0] != CT_APP {
                    return Err(Failure::new("tls_protocol", format!("unencrypted record type {}", head[0])));
                }
                if len < tag_len + 1 {
                    return Err(bad());
                }
                let nonce = aead::Nonce::assume_unique_for_key(self.rx.nonce());
                let plain = self
                    .rx
                    .key
                    .open_within(nonce, aead::Aad::from(head), &mut buf[w..end], (r + 5 - w)..)
                    .map_err(|_| bad())?;
                self.rx.seq += 1;
                // The real content type is the last non-zero byte (zeros after it are padding).
                let Some(k) = plain.iter().rposition(|&b| b != 0) else {
                    return Err(Failure::new("tls_protocol", "record without a content type"));
                };
                Ok((plain[k], k))
            }
            Framing::Tls12Gcm | Framing::Tls12Chacha => {
                let explicit = if self.framing == Framing::Tls12Gcm { 8 } else { 0 };
                if len < explicit + tag_len {
                    return Err(bad());
                }
                let nonce = if explicit > 0 {
                    let mut n = [0u8; 12];
                    n[..4].copy_from_slice(&self.rx.iv[..4]);
                    n[4..].copy_from_slice(&buf[r + 5..r + 13]);
                    n
                } else {
                    self.rx.nonce()
                };
                let aad = tls12_aad(self.rx.seq, head[0], [head[1], head[2]], len - explicit - tag_len);
                let plain = self
                    .rx
                    .key
                    .open_within(
                        aead::Nonce::assume_unique_for_key(nonce),
                        aead::Aad::from(aad),
                        &mut buf[w..end],
                        (r + 5 + explicit - w)..,
                    )
                    .map_err(|_| bad())?;
                self.rx.seq += 1;
                Ok((head[0], plain.len()))
            }
        }
    }

    /// Handshake messages after the handshake: TLS 1.3 session tickets (kept for resumption) and key
    /// updates; TLS 1.2 hello requests (renegotiation, ignored).
    #[cold]
    fn on_handshake(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), Failure> {
        self.hs_msgs.extend_from_slice(data);
        while self.hs_msgs.len() >= 4 {
            let m = &self.hs_msgs;
            let len = u32::from_be_bytes([0, m[1], m[2], m[3]]) as usize;
            if m.len() < 4 + len {
                break;
            }
            let (typ, body) = (m[0], &m[4..4 + len]);
            match (self.framing, typ) {
                (Framing::Tls13, HS_NEW_SESSION_TICKET) => {
                    // A ticket the cache cannot take only costs a later connection its resumption.
                    if let Some(k) = self.kernel.as_mut() {
                        let _ = k.handle_new_session_ticket(body);
                    }
                }
                (Framing::Tls13, HS_KEY_UPDATE) => {
                    let requested = body.first() == Some(&1);
                    let s = self.kernel()?.update_rx_secret().map_err(|e| Failure::from_rustls(&e))?;
                    self.rx = Keys::new(s)?.0;
                    if requested {
                        self.seal_raw(out, CT_HANDSHAKE, &[HS_KEY_UPDATE, 0, 0, 1, 0])?;
                        self.tx = self.next_tx()?;
                    }
                }
                (Framing::Tls12Gcm | Framing::Tls12Chacha, HS_HELLO_REQUEST) => {}
                (_, t) => {
                    return Err(Failure::new(
                        "tls_protocol",
                        format!("unexpected handshake message {t} after the handshake"),
                    ))
                }
            }
            self.hs_msgs.drain(..4 + len);
        }
        Ok(())
    }
}

/// The failure an alert record means: `close_notify` is the end of the stream.
fn alert(body: &[u8]) -> Failure {
    match body {
        [_, 0] => Failure::new("eof", "the server sent close_notify"),
        [_, d] => {
            let desc = rustls::AlertDescription::from(*d);
            Failure::new(
                &format!("tls_alert_{}", snake(&format!("{desc:?}"))),
                format!("the server sent the alert {desc:?}"),
            )
        }
        _ => Failure::new("tls_protocol", "malformed alert"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(snake("HandshakeFailure"), "handshake_failure");
        assert_eq!(snake("BadCertificate"), "bad_certificate");
        assert_eq!(alert(&[1, 0]).kind, "eof");
        assert_eq!(alert(&[2, 42]).kind, "tls_alert_bad_certificate");
        let f = Failure::from_rustls(&rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
        assert_eq!(f.kind, "tls_unknown_issuer");
        assert!(f.is_certificate());
    }

    /// Counts this thread's allocations (the test runner's other threads do not disturb the count).
    struct Counting;

    thread_local! {
        static ALLOCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    fn count() {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    }

    fn allocs() -> u64 {
        ALLOCS.with(|c| c.get())
    }

    // SAFETY: every call is passed on to the system allocator unchanged; counting touches no memory of it.
    unsafe impl std::alloc::GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
            count();
            // SAFETY: the caller's contract for `alloc` is the system allocator's.
            unsafe { std::alloc::System.alloc(l) }
        }

        unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
            // SAFETY: `p` came from the system allocator with layout `l`.
            unsafe { std::alloc::System.dealloc(p, l) }
        }

        unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, size: usize) -> *mut u8 {
            count();
            // SAFETY: `p` came from the system allocator with layout `l`; the caller's contract holds.
            unsafe { std::alloc::System.realloc(p, l, size) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    fn keys(alg: &'static aead::Algorithm, byte: u8) -> Keys {
        let key = vec![byte; alg.key_len()];
        Keys { key: aead::LessSafeKey::new(aead::UnboundKey::new(alg, &key).unwrap()), iv: [byte ^ 0x5a; 12], seq: 3 }
    }

    /// A client's records and the server's (keys swapped), without rustls's key schedule.
    fn pair(framing: Framing, alg: &'static aead::Algorithm) -> (Records, Records) {
        let rec = |tx, rx| Records {
            framing,
            tx: keys(alg, tx),
            rx: keys(alg, rx),
            limit: u64::MAX,
            kernel: None,
            hs_msgs: Vec::new(),
        };
        (rec(1, 2), rec(2, 1))
    }

    /// Seals `msgs` on `from`, feeds the wire bytes to `to` in pieces of `piece` bytes the way
    /// [`TlsConn::read`] does (the partial record carried in front of the next piece), returns what
    /// `to` opened.
    fn carry_through(from: &mut Records, to: &mut Records, msgs: &[&[u8]], piece: usize, state: &mut Wire) {
        state.wire.clear();
        for m in msgs {
            for chunk in m.chunks(MAX_FRAGMENT) {
                from.seal(&mut state.wire, CT_APP, chunk).unwrap();
            }
        }
        state.got.clear();
        state.carry.clear();
        for p in state.wire.chunks(piece) {
            let c = state.carry.len();
            state.buf[..c].copy_from_slice(&state.carry);
            state.buf[c..c + p.len()].copy_from_slice(p);
            let total = c + p.len();
            let (n, used) = to.open_all(&mut state.buf[..total], &mut state.reply).map_err(|s| s.failure).unwrap();
            state.got.extend_from_slice(&state.buf[..n]);
            state.carry.clear();
            state.carry.extend_from_slice(&state.buf[used..total]);
        }
        assert!(state.carry.is_empty());
    }

    struct Wire {
        wire: Vec<u8>,
        buf: Vec<u8>,
        carry: Vec<u8>,
        got: Vec<u8>,
        reply: Vec<u8>,
    }

    #[test]
    fn records_round_trip_in_place_without_allocating() {
        let cases = [
            (Framing::Tls13, &aead::AES_128_GCM),
            (Framing::Tls13, &aead::CHACHA20_POLY1305),
            (Framing::Tls12Gcm, &aead::AES_256_GCM),
            (Framing::Tls12Chacha, &aead::CHACHA20_POLY1305),
        ];
        let big: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let small = b"{\"bt\":[1,2,3],\"pad\":\"xxxxxxxx\"}";
        for (framing, alg) in cases {
            let (mut client, mut server) = pair(framing, alg);
            let mut w = Wire {
                wire: Vec::with_capacity(1 << 20),
                buf: vec![0; 1 << 20],
                carry: Vec::with_capacity(READ_ROOM),
                got: Vec::with_capacity(1 << 20),
                reply: Vec::new(),
            };
            let msgs: [&[u8]; 4] = [small, &big, small, small];
            let expect: Vec<u8> = msgs.concat();
            // Both directions, in whole reads and in pieces that split records and headers.
            for piece in [1 << 20, 7, 4096] {
                carry_through(&mut server, &mut client, &msgs, piece, &mut w);
                assert_eq!(w.got, expect, "{framing:?} piece {piece}");
                carry_through(&mut client, &mut server, &msgs, piece, &mut w);
                assert_eq!(w.got, expect, "{framing:?} piece {piece}");
            }
            // Warm now: sealing and opening allocate nothing (and the count does see an allocation).
            let before = allocs();
            std::hint::black_box(Vec::<u8>::with_capacity(10));
            assert_eq!(allocs() - before, 1);
            let before = allocs();
            for _ in 0..100 {
                carry_through(&mut server, &mut client, &[small, small, &big], 65_536, &mut w);
                carry_through(&mut client, &mut server, &[small], 65_536, &mut w);
            }
            assert_eq!(allocs() - before, 0, "{framing:?}");
            // A changed byte does not open.
            w.wire.clear();
            server.seal(&mut w.wire, CT_APP, small).unwrap();
            let n = w.wire.len();
            w.wire[n - 1] ^= 1;
            w.buf[..n].copy_from_slice(&w.wire);
            let err = client.open_all(&mut w.buf[..n], &mut w.reply).err().unwrap();
            assert_eq!(err.failure.kind, "tls_decrypt_error");
        }
    }

    #[test]
    fn nonces_and_aad() {
        let k = Keys {
            key: aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_128_GCM, &[7; 16]).unwrap()),
            iv: [0xff; 12],
            seq: 0x0102,
        };
        let n = k.nonce();
        assert_eq!(&n[..10], &[0xff; 10]);
        assert_eq!(&n[10..], &[0xfe, 0xfd]);
        assert_eq!(tls12_aad(1, 23, [3, 3], 300), [0, 0, 0, 0, 0, 0, 0, 1, 23, 3, 3, 1, 44]);
    }
}

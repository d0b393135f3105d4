//! Identity and policy: who a connection is, and what it may do.
//!
//! - [`Auth`]: the JWT verifier, built once at start from the configured key (HS256 secret, or an RS256 or
//!   ES256 public key in PEM). The algorithm is pinned: a token whose header names another one — `none`, or
//!   HS256 signed with the public key as a secret — is refused by `jsonwebtoken`'s algorithm check before
//!   any signature is computed. `exp` and `nbf` are checked with a leeway, `iss` and `aud` when configured,
//!   `sub` is required. Tokens longer than `max_token_bytes` are refused before decoding.
//! - [`Identity`]: what a connection may do, from its token's claims (`sub`, `roles`, `channels`,
//!   `publish`) or, in the open development mode, from `?user=` with everything allowed.
//! - [`Identity::may`]: the permission check for a command on a channel (see its docs for the rules).
//! - [`net`]: client addresses (trusted proxies, forwarding headers) and origins; [`limits`]: connections
//!   per user and address, upgrades per second per address.

pub mod limits;
pub mod net;

use std::net::IpAddr;
use std::num::NonZeroU64;
use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{AuthConfig, JwtAlg, JwtKey, Namespace};

/// Most roles, and most patterns of each kind, a token may carry.
pub const MAX_CLAIM_ITEMS: usize = 64;
/// Longest role or pattern, in bytes.
pub const MAX_CLAIM_ITEM_BYTES: usize = 128;

/// The claims Throng reads.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    exp: Option<u64>,
    /// Read only so that a malformed `nbf` is refused: jsonwebtoken checks `nbf` when it parses as a number
    /// and silently skips it otherwise, which would make `"nbf":"tomorrow"` a token valid today (found by the
    /// `token` fuzz target).
    #[serde(default)]
    #[allow(dead_code)]
    nbf: Option<u64>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// Why a token was refused: the reason the client reads in the 401's JSON body or the `refresh` error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Longer than `max_token_bytes`; not decoded.
    #[error("token is larger than {0} bytes")]
    TooLarge(usize),
    /// Not three base64url parts with a JSON header and body.
    #[error("malformed token")]
    Malformed,
    /// The header names an algorithm other than the configured one (`none` included).
    #[error("token algorithm is not the one this server accepts")]
    WrongAlgorithm,
    /// The signature does not verify with the configured key.
    #[error("bad token signature")]
    BadSignature,
    /// `exp` has passed (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` has not come yet (beyond the leeway).
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    /// `iss` is missing or not the configured one.
    #[error("wrong token issuer")]
    WrongIssuer,
    /// `aud` is missing or not the configured one.
    #[error("wrong token audience")]
    WrongAudience,
    /// A required claim (`sub`) is missing, or a claim has the wrong type.
    #[error("token lacks a valid {0} claim")]
    BadClaim(&'static str),
}

/// What a connection is and may do. One per `/ws` connection, shared (`Arc`) by its commands.
#[derive(Debug)]
pub struct Identity {
    /// The user (`sub`, or `?user=` in the open development mode). An `Arc`: every presence table the
    /// connection is counted in holds this one allocation rather than a copy of the name.
    pub user: Arc<str>,
    /// The token's roles and patterns; `None` when it has none (and always in the open development mode):
    /// one pointer here rather than three boxed slices, most connections never carry any.
    pub grants: Option<Box<Grants>>,
    /// `exp`, Unix seconds, if the token has one ([`Identity::exp`]; never 0, which is long past: 8 B).
    pub exp: Option<NonZeroU64>,
    /// The client address this connection is counted under in the per-address limit (`None`: not counted).
    pub ip: Option<IpAddr>,
    /// The open development mode: every channel but other users' personal ones.
    pub open: bool,
}

/// Size budget of an [`Identity`] (one per `/ws` connection, in an `Arc`: 16 B of counts more, an 80 B heap
/// block), checked at compile time.
pub const IDENTITY_BUDGET: usize = 56;
const _: () = assert!(std::mem::size_of::<Identity>() <= IDENTITY_BUDGET);

/// What a token grants beyond its user: [`Identity::grants`].
#[derive(Debug)]
pub struct Grants {
    /// Token roles.
    pub roles: Box<[Box<str>]>,
    /// Patterns of channels the token lets it subscribe to (and read).
    pub channels: Box<[Box<str>]>,
    /// Patterns of channels the token lets it publish to.
    pub publish: Box<[Box<str>]>,
}

/// What a command wants to do with a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `subscribe`.
    Subscribe,
    /// `publish`.
    Publish,
    /// `presence`.
    Presence,
    /// `history`.
    History,
}

/// Why a command on a channel is refused (the `forbidden` error's reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// `user:<x>` of another user.
    NotYourPersonalChannel,
    /// Publishing to a personal channel.
    PersonalChannelPublish,
    /// The namespace does not let clients publish.
    NoClientPublish,
    /// Neither the token's patterns nor its roles grant it.
    NotGranted,
}

impl Denied {
    /// The reason sent to the client.
    pub fn reason(self) -> &'static str {
        match self {
            Denied::NotYourPersonalChannel => "personal channels are only for their owner",
            Denied::PersonalChannelPublish => "clients may not publish to personal channels",
            Denied::NoClientPublish => "clients may not publish in this namespace",
            Denied::NotGranted => "your token grants no access to this channel for this command",
        }
    }
}

/// `*` matches any run of characters (none included); everything else matches itself. Linear in practice:
/// the classic two-pointer algorithm with one backtrack point, O(n·m) at worst on 128-byte inputs.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < t.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == t[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&b| b == b'*')
}

fn grants(roles_allowed: &[String], roles: &[Box<str>]) -> bool {
    roles_allowed.iter().any(|r| r == "*" || roles.iter().any(|mine| **mine == **r))
}

impl Identity {
    /// An identity of the open development mode.
    pub fn open(user: &str) -> Self {
        Identity { user: user.into(), grants: None, exp: None, ip: None, open: true }
    }

    /// `exp`, Unix seconds, if the token has one.
    pub fn exp(&self) -> Option<u64> {
        self.exp.map(NonZeroU64::get)
    }

    /// The token's roles (none in the open development mode).
    pub fn roles(&self) -> &[Box<str>] {
        self.grants.as_ref().map_or(&[], |g| &g.roles)
    }

    /// The token's `channels` patterns.
    pub fn channels(&self) -> &[Box<str>] {
        self.grants.as_ref().map_or(&[], |g| &g.channels)
    }

    /// The token's `publish` patterns.
    pub fn publish(&self) -> &[Box<str>] {
        self.grants.as_ref().map_or(&[], |g| &g.publish)
    }

    /// Whether this connection may do `action` on `channel` of namespace `ns`:
    /// - `user:<sub>` is its owner's alone (subscribe, presence, history); nobody publishes there;
    /// - a namespace with `client_publish = false` refuses every client publish;
    /// - in the open development mode, everything else is allowed;
    /// - otherwise subscribing needs a `channels` pattern of the token that matches, or one of the token's
    ///   roles in the namespace's `subscribe_roles` (`"*"`: every authenticated user); publishing the same with
    ///   `publish` and `publish_roles`; presence and history need `presence_roles` / `history_roles` when the
    ///   namespace sets them, and the right to subscribe when it does not.
    pub fn may(&self, action: Action, channel: &str, ns: &Namespace) -> Result<(), Denied> {
        if ns.name == "user" {
            let owner = channel.split_once(':').map_or("", |(_, n)| n);
            return match action {
                Action::Publish => Err(Denied::PersonalChannelPublish),
                _ if owner == &*self.user => Ok(()),
                _ => Err(Denied::NotYourPersonalChannel),
            };
        }
        if action == Action::Publish && !ns.client_publish {
            return Err(Denied::NoClientPublish);
        }
        if self.open {
            return Ok(());
        }
        let roles = self.roles();
        let read = || self.channels().iter().any(|p| glob(p, channel)) || grants(&ns.subscribe_roles, roles);
        let ok = match action {
            Action::Subscribe => read(),
            Action::Publish => self.publish().iter().any(|p| glob(p, channel)) || grants(&ns.publish_roles, roles),
            Action::Presence => ns.presence_roles.as_ref().map_or_else(read, |r| grants(r, roles)),
            Action::History => ns.history_roles.as_ref().map_or_else(read, |r| grants(r, roles)),
        };
        if ok {
            Ok(())
        } else {
            Err(Denied::NotGranted)
        }
    }
}

/// The JWT verifier (see the module docs).
pub struct Auth {
    key: DecodingKey,
    validation: Validation,
    max_token_bytes: usize,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("algorithms", &self.validation.algorithms).finish_non_exhaustive()
    }
}

/// Whether `u` is a valid user name: the channel-name charset, so `user:<name>` is a valid channel.
pub fn valid_user(u: &str) -> bool {
    (1..=128).contains(&u.len()) && u.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.@=/-".contains(&b))
}

impl Auth {
    /// Parses the configured key once. `Ok(None)`: no key, the open development mode.
    pub fn new(cfg: &AuthConfig) -> anyhow::Result<Option<Self>> {
        let Some((key, alg)) = &cfg.key else { return Ok(None) };
        let (key, algorithm) = match (key, alg) {
            (JwtKey::Secret(s), JwtAlg::Hs256) => (DecodingKey::from_secret(s.as_bytes()), Algorithm::HS256),
            (JwtKey::Pem(pem, path), JwtAlg::Rs256) => (
                DecodingKey::from_rsa_pem(pem).map_err(|e| {
                    anyhow::anyhow!("jwt_public_key {}: not an RSA public key in PEM: {e}", path.display())
                })?,
                Algorithm::RS256,
            ),
            (JwtKey::Pem(pem, path), JwtAlg::Es256) => (
                DecodingKey::from_ec_pem(pem).map_err(|e| {
                    anyhow::anyhow!("jwt_public_key {}: not an EC public key in PEM: {e}", path.display())
                })?,
                Algorithm::ES256,
            ),
            (k, a) => anyhow::bail!("key {k:?} does not go with {a:?}"),
        };
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.leeway = cfg.leeway;
        validation.validate_nbf = true;
        validation.required_spec_claims = ["sub".to_string()].into_iter().collect();
        match &cfg.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                validation.required_spec_claims.insert("iss".into());
            }
            None => validation.iss = None,
        }
        match &cfg.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        Ok(Some(Auth { key, validation, max_token_bytes: cfg.max_token_bytes }))
    }

    /// Verifies `token` and builds the identity it grants.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        if token.len() > self.max_token_bytes {
            return Err(TokenError::TooLarge(self.max_token_bytes));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => TokenError::WrongAlgorithm,
            ErrorKind::InvalidSignature => TokenError::BadSignature,
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
            ErrorKind::InvalidAudience => TokenError::WrongAudience,
            ErrorKind::MissingRequiredClaim(c) if c == "iss" => TokenError::WrongIssuer,
            ErrorKind::MissingRequiredClaim(c) if c == "aud" => TokenError::WrongAudience,
            ErrorKind::MissingRequiredClaim(_) => TokenError::BadClaim("sub"),
            // The header is JSON too: an unknown `alg` ("none", say) fails there, so tell the two apart
            // (only on this error path; a good token is not decoded twice).
            ErrorKind::Json(_) if jsonwebtoken::decode_header(token).is_err() => TokenError::WrongAlgorithm,
            ErrorKind::Json(_) => TokenError::BadClaim("sub, exp, nbf, roles, channels or publish"),
            _ => TokenError::Malformed,
        })?;
        let c = data.claims;
        if !valid_user(&c.sub) {
            return Err(TokenError::BadClaim("sub (1-128 characters of [A-Za-z0-9_.@=/-])"));
        }
        let items = |v: Vec<String>, what: &'static str| -> Result<Box<[Box<str>]>, TokenError> {
            if v.len() > MAX_CLAIM_ITEMS || v.iter().any(|s| s.is_empty() || s.len() > MAX_CLAIM_ITEM_BYTES) {
                return Err(TokenError::BadClaim(what));
            }
            Ok(v.into_iter().map(String::into_boxed_str).collect())
        };
        let g = Grants {
            roles: items(c.roles, "roles (at most 64 of at most 128 bytes)")?,
            channels: items(c.channels, "channels (at most 64 patterns of at most 128 bytes)")?,
            publish: items(c.publish, "publish (at most 64 patterns of at most 128 bytes)")?,
        };
        let any = !(g.roles.is_empty() && g.channels.is_empty() && g.publish.is_empty());
        // `exp` 0 is 1970: expired beyond any leeway (jsonwebtoken refuses it before this).
        let exp = match c.exp {
            Some(0) => return Err(TokenError::Expired),
            e => e.and_then(NonZeroU64::new),
        };
        Ok(Identity { user: Arc::from(c.sub), grants: any.then(|| Box::new(g)), exp, ip: None, open: false })
    }
}

/// Where the token of an upgrade request is, if anywhere: `?token=`, `Authorization: Bearer`, or the
/// subprotocol `bearer.<jwt>`. A token in more than one place is refused (which one would be meant?).
pub fn token_of<'r>(
    req: &'r throng_protocol::handshake::Request<'_>,
) -> Result<Option<std::borrow::Cow<'r, str>>, &'static str> {
    let query = req.query_param("token");
    let header = req.bearer_token();
    let sub = req.subprotocol_bearer();
    match (query, header, sub) {
        (Some(t), None, None) => Ok(Some(t)),
        (None, Some(t), None) | (None, None, Some(t)) => Ok(Some(std::borrow::Cow::Borrowed(t))),
        (None, None, None) => Ok(None),
        _ => Err("a token in more than one place (query, Authorization, subprotocol): send one"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("chat:*", "chat:lobby") && glob("*", "anything") && glob("a*b*c", "axxbyyc"));
        assert!(!glob("chat:*", "news:1") && !glob("a*b", "ab c") && glob("", "") && !glob("", "x"));
        assert!(glob("room:*:public", "room:1:public") && !glob("room:*:public", "room:1:private"));
        // Linear enough on a hostile pattern at the length bound.
        let p = "*a".repeat(64);
        let t = "a".repeat(127) + "b";
        assert!(!glob(&p, &t));
    }

    fn ns(name: &str) -> Namespace {
        let mut cfg =
            crate::config::Config::load(<crate::config::Cli as clap::Parser>::parse_from(["throng"])).unwrap();
        let mut n = cfg.namespaces.fallback.clone();
        n.name = name.into();
        cfg.namespaces.list.clear();
        n
    }

    fn token_identity(roles: &[&str], channels: &[&str], publish: &[&str]) -> Identity {
        let b = |v: &[&str]| v.iter().map(|s| Box::<str>::from(*s)).collect();
        let g = Grants { roles: b(roles), channels: b(channels), publish: b(publish) };
        Identity { user: "alice".into(), grants: Some(Box::new(g)), exp: None, ip: None, open: false }
    }

    #[test]
    fn permissions() {
        let chat = ns("chat");
        let me = token_identity(&["member"], &["chat:*"], &["chat:lobby"]);
        assert_eq!(me.may(Action::Subscribe, "chat:x", &chat), Ok(()));
        assert_eq!(me.may(Action::Publish, "chat:lobby", &chat), Ok(()));
        assert_eq!(me.may(Action::Publish, "chat:x", &chat), Err(Denied::NotGranted));
        assert_eq!(me.may(Action::Presence, "chat:x", &chat), Ok(()), "presence follows subscribe by default");
        let mut staff = ns("chat");
        staff.presence_roles = Some(vec!["staff".into()]);
        staff.subscribe_roles = vec!["member".into()];
        assert_eq!(me.may(Action::Presence, "chat:x", &staff), Err(Denied::NotGranted));
        let nobody = token_identity(&["member"], &[], &[]);
        assert_eq!(nobody.may(Action::Subscribe, "chat:x", &staff), Ok(()), "granted by role");
        assert_eq!(nobody.may(Action::Subscribe, "chat:x", &chat), Err(Denied::NotGranted));
        let mut everyone = ns("news");
        everyone.subscribe_roles = vec!["*".into()];
        assert_eq!(nobody.may(Action::Subscribe, "news:1", &everyone), Ok(()));
        let user = ns("user");
        assert_eq!(me.may(Action::Subscribe, "user:alice", &user), Ok(()));
        assert_eq!(me.may(Action::Subscribe, "user:bob", &user), Err(Denied::NotYourPersonalChannel));
        assert_eq!(me.may(Action::Presence, "user:bob", &user), Err(Denied::NotYourPersonalChannel));
        assert_eq!(me.may(Action::Publish, "user:alice", &user), Err(Denied::PersonalChannelPublish));
        let open = Identity::open("bob");
        assert_eq!(open.may(Action::Publish, "chat:x", &chat), Ok(()));
        assert_eq!(open.may(Action::Subscribe, "user:alice", &user), Err(Denied::NotYourPersonalChannel));
        let mut quiet = ns("q");
        quiet.client_publish = false;
        assert_eq!(open.may(Action::Publish, "q:1", &quiet), Err(Denied::NoClientPublish));
    }
}

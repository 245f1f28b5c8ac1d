//! Who a peer is and what it may call: the principal kinds of a flyfs
//! cluster, the identity URI carried in every certificate, and the [`Roles`]
//! each [`Method`](crate::Method) allows.
//!
//! This lives in flyfs-proto (not in flyfs-rpc, which does the TLS) because
//! the allowed roles are part of each method's declaration, beside its id and
//! messages, and because services bind identities (a storage node id, an
//! admin's uid) without knowing how they were authenticated. No runtime
//! dependency: the identity is plain text, parsed here.
//!
//! The identity URI (docs/security.md):
//!
//! ```text
//! flyfs://<cluster>/storage/<node id>
//! flyfs://<cluster>/meta/<name>
//! flyfs://<cluster>/mgmt/<name>
//! flyfs://<cluster>/client/<name>
//! flyfs://<cluster>/admin/<name>?uid=<uid>&gid=<gid>
//! ```
//!
//! Parsing is strict, so that one identity has exactly one spelling and a
//! round trip through text is exact: names are 1 to [`NAME_LEN_MAX`] bytes of
//! `[A-Za-z0-9._-]`, numbers are decimal without sign or leading zeros, an
//! admin names both `uid` and `gid` in that order and no other principal has
//! a query.

use std::fmt;
use std::str::FromStr;

use crate::ids::NodeId;

/// The scheme every identity URI starts with.
pub const SCHEME: &str = "flyfs://";
/// Longest cluster or principal name, in bytes.
pub const NAME_LEN_MAX: usize = 64;
/// Longest identity URI, in bytes: checked before anything else is parsed.
pub const URI_LEN_MAX: usize = 256;

/// The kind of a principal: what a certificate lets its holder be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A storage daemon (one node id).
    Storage,
    /// A metadata service daemon.
    Meta,
    /// A cluster manager daemon.
    Mgmt,
    /// A mount or a program using the client library.
    Client,
    /// An operator's tool, acting as one uid/gid.
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Storage,
        Role::Meta,
        Role::Mgmt,
        Role::Client,
        Role::Admin,
    ];

    /// The role's path segment in the identity URI, and its name in messages.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Storage => "storage",
            Role::Meta => "meta",
            Role::Mgmt => "mgmt",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }

    const fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// Whether this role is one of the cluster's daemons (the only roles a
    /// client accepts from a server).
    pub const fn is_daemon(self) -> bool {
        matches!(self, Role::Storage | Role::Meta | Role::Mgmt)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;

    fn from_str(text: &str) -> Result<Role, IdentityError> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == text)
            .ok_or_else(|| IdentityError::UnknownRole(text.chars().take(32).collect()))
    }
}

/// A set of roles: who may call a method.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Roles(u8);

impl Roles {
    pub const NONE: Roles = Roles(0);
    pub const STORAGE: Roles = Roles(Role::Storage.bit());
    pub const META: Roles = Roles(Role::Meta.bit());
    pub const MGMT: Roles = Roles(Role::Mgmt.bit());
    pub const CLIENT: Roles = Roles(Role::Client.bit());
    pub const ADMIN: Roles = Roles(Role::Admin.bit());
    /// Every authenticated peer.
    pub const ALL: Roles = Roles(
        Role::Storage.bit()
            | Role::Meta.bit()
            | Role::Mgmt.bit()
            | Role::Client.bit()
            | Role::Admin.bit(),
    );

    /// The union; `const` so that method declarations can spell
    /// `Roles::CLIENT.or(Roles::ADMIN)`.
    pub const fn or(self, other: Roles) -> Roles {
        Roles(self.0 | other.0)
    }

    pub const fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The roles in the set, in [`Role::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Role> {
        Role::ALL
            .into_iter()
            .filter(move |role| self.contains(*role))
    }
}

impl From<Role> for Roles {
    fn from(role: Role) -> Roles {
        Roles(role.bit())
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("(none)");
        }
        for (i, role) in self.iter().enumerate() {
            if i > 0 {
                f.write_str("|")?;
            }
            f.write_str(role.as_str())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Roles({self})")
    }
}

/// One principal: a role and what is bound to it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A storage daemon; only this certificate may register or heartbeat as
    /// this node.
    Storage(NodeId),
    Meta(String),
    Mgmt(String),
    Client(String),
    /// An operator's tool: the metadata service runs its requests as
    /// `uid`/`gid` (no supplementary groups) and refuses one that names
    /// another caller.
    Admin {
        name: String,
        uid: u32,
        gid: u32,
    },
}

impl Principal {
    pub fn role(&self) -> Role {
        match self {
            Principal::Storage(_) => Role::Storage,
            Principal::Meta(_) => Role::Meta,
            Principal::Mgmt(_) => Role::Mgmt,
            Principal::Client(_) => Role::Client,
            Principal::Admin { .. } => Role::Admin,
        }
    }
}

/// A peer's identity: its cluster and principal, as its certificate names
/// them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub cluster: String,
    pub principal: Principal,
}

impl Identity {
    /// An identity with checked names; the error says which name was wrong.
    pub fn new(cluster: &str, principal: Principal) -> Result<Identity, IdentityError> {
        check_name("cluster", cluster)?;
        match &principal {
            Principal::Storage(_) => {}
            Principal::Meta(name) | Principal::Mgmt(name) | Principal::Client(name) => {
                check_name("principal", name)?;
            }
            Principal::Admin { name, .. } => check_name("principal", name)?,
        }
        Ok(Identity {
            cluster: cluster.to_owned(),
            principal,
        })
    }

    pub fn role(&self) -> Role {
        self.principal.role()
    }

    /// The principal's name: a storage node's id in decimal.
    pub fn name(&self) -> String {
        match &self.principal {
            Principal::Storage(node) => node.0.to_string(),
            Principal::Meta(name)
            | Principal::Mgmt(name)
            | Principal::Client(name)
            | Principal::Admin { name, .. } => name.clone(),
        }
    }

    /// The node id, for a storage daemon.
    pub fn storage_node(&self) -> Option<NodeId> {
        match self.principal {
            Principal::Storage(node) => Some(node),
            _ => None,
        }
    }

    /// The identity URI (the inverse of [`Identity::parse_uri`]).
    pub fn to_uri(&self) -> String {
        let mut uri = format!(
            "{SCHEME}{}/{}/{}",
            self.cluster,
            self.role().as_str(),
            self.name()
        );
        if let Principal::Admin { uid, gid, .. } = self.principal {
            uri.push_str(&format!("?uid={uid}&gid={gid}"));
        }
        uri
    }

    /// Parses an identity URI strictly (see the module doc).
    pub fn parse_uri(uri: &str) -> Result<Identity, IdentityError> {
        if uri.len() > URI_LEN_MAX {
            return Err(IdentityError::TooLong { len: uri.len() });
        }
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::NotFlyfs(uri.chars().take(64).collect()))?;
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        let mut segments = path.split('/');
        let (Some(cluster), Some(role), Some(name), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(IdentityError::Shape);
        };
        check_name("cluster", cluster)?;
        let role: Role = role.parse()?;
        check_name("principal", name)?;
        if role != Role::Admin && query.is_some() {
            return Err(IdentityError::UnexpectedQuery { role });
        }
        let principal = match role {
            Role::Storage => Principal::Storage(NodeId(parse_number("node id", name)?)),
            Role::Meta => Principal::Meta(name.to_owned()),
            Role::Mgmt => Principal::Mgmt(name.to_owned()),
            Role::Client => Principal::Client(name.to_owned()),
            Role::Admin => {
                let query = query.ok_or(IdentityError::AdminWithoutUser)?;
                let (uid, gid) = query
                    .split_once('&')
                    .ok_or(IdentityError::AdminWithoutUser)?;
                let uid = uid
                    .strip_prefix("uid=")
                    .ok_or(IdentityError::AdminWithoutUser)?;
                let gid = gid
                    .strip_prefix("gid=")
                    .ok_or(IdentityError::AdminWithoutUser)?;
                Principal::Admin {
                    name: name.to_owned(),
                    uid: parse_number("uid", uid)?,
                    gid: parse_number("gid", gid)?,
                }
            }
        };
        Ok(Identity {
            cluster: cluster.to_owned(),
            principal,
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_uri())
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(uri: &str) -> Result<Identity, IdentityError> {
        Identity::parse_uri(uri)
    }
}

/// An identity URI or name was not valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity URI is {len} bytes, over the limit of {URI_LEN_MAX}")]
    TooLong { len: usize },
    #[error("identity {0:?} does not start with {SCHEME:?}")]
    NotFlyfs(String),
    #[error("identity URI must be flyfs://<cluster>/<role>/<name>")]
    Shape,
    #[error("unknown role {0:?} (expected storage, meta, mgmt, client or admin)")]
    UnknownRole(String),
    #[error(
        "{what} name {name:?} is not 1 to {NAME_LEN_MAX} bytes of letters, digits, '.', '_' or '-'"
    )]
    BadName { what: &'static str, name: String },
    #[error("{what} {text:?} is not a decimal number without leading zeros that fits 32 bits")]
    BadNumber { what: &'static str, text: String },
    #[error("an admin identity must end with ?uid=<uid>&gid=<gid>")]
    AdminWithoutUser,
    #[error("a {role} identity has no query; only admin identities name a uid and gid")]
    UnexpectedQuery { role: Role },
}

fn check_name(what: &'static str, name: &str) -> Result<(), IdentityError> {
    let valid = !name.is_empty()
        && name.len() <= NAME_LEN_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(IdentityError::BadName {
            what,
            name: name.chars().take(NAME_LEN_MAX + 1).collect(),
        })
    }
}

fn parse_number(what: &'static str, text: &str) -> Result<u32, IdentityError> {
    let bad = || IdentityError::BadNumber {
        what,
        text: text.chars().take(16).collect(),
    };
    // One spelling per number: no sign, no leading zero (but "0" itself).
    if text.is_empty()
        || !text.bytes().all(|b| b.is_ascii_digit())
        || (text.len() > 1 && text.starts_with('0'))
    {
        return Err(bad());
    }
    text.parse().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn every_principal_kind_parses() {
        let cases = [
            ("flyfs://c1/storage/7", Principal::Storage(NodeId(7))),
            ("flyfs://c1/meta/m-0", Principal::Meta("m-0".into())),
            ("flyfs://c1/mgmt/mgmt", Principal::Mgmt("mgmt".into())),
            (
                "flyfs://c1/client/host.a",
                Principal::Client("host.a".into()),
            ),
            (
                "flyfs://c1/admin/alice?uid=1000&gid=100",
                Principal::Admin {
                    name: "alice".into(),
                    uid: 1000,
                    gid: 100,
                },
            ),
        ];
        for (uri, principal) in cases {
            let identity = Identity::parse_uri(uri).expect(uri);
            assert_eq!(identity.cluster, "c1");
            assert_eq!(identity.principal, principal);
            assert_eq!(identity.to_uri(), uri);
        }
    }

    #[test]
    fn bad_uris_say_what_was_wrong() {
        let cases: &[(&str, &str)] = &[
            ("https://c/meta/m", "does not start with"),
            ("flyfs://c/meta", "must be flyfs://"),
            ("flyfs://c/meta/m/x", "must be flyfs://"),
            ("flyfs://c/root/m", "unknown role \"root\""),
            ("flyfs://c/meta/", "principal name \"\""),
            ("flyfs:///meta/m", "cluster name \"\""),
            ("flyfs://c/meta/a b", "principal name \"a b\""),
            ("flyfs://c/storage/x", "node id \"x\""),
            ("flyfs://c/storage/07", "node id \"07\""),
            ("flyfs://c/storage/4294967296", "node id"),
            ("flyfs://c/admin/a", "must end with ?uid"),
            ("flyfs://c/admin/a?gid=1&uid=1", "must end with ?uid"),
            ("flyfs://c/admin/a?uid=1&gid=-1", "gid \"-1\""),
            (
                "flyfs://c/client/a?uid=1&gid=1",
                "a client identity has no query",
            ),
        ];
        for (uri, expected) in cases {
            let error = Identity::parse_uri(uri).expect_err(uri).to_string();
            assert!(error.contains(expected), "{uri}: {error}");
        }
        let long = format!("flyfs://c/meta/{}", "m".repeat(URI_LEN_MAX));
        assert!(matches!(
            Identity::parse_uri(&long),
            Err(IdentityError::TooLong { .. })
        ));
        let name = "n".repeat(NAME_LEN_MAX + 1);
        assert!(Identity::new("c", Principal::Client(name)).is_err());
    }

    #[test]
    fn roles_are_a_set() {
        let roles = Roles::CLIENT.or(Roles::ADMIN);
        assert!(roles.contains(Role::Client) && roles.contains(Role::Admin));
        assert!(!roles.contains(Role::Storage));
        assert_eq!(roles.to_string(), "client|admin");
        assert_eq!(Roles::ALL.iter().count(), 5);
        assert_eq!(Roles::NONE.to_string(), "(none)");
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
    }

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,64}"
    }

    fn principal() -> impl Strategy<Value = Principal> {
        prop_oneof![
            any::<u32>().prop_map(|n| Principal::Storage(NodeId(n))),
            name().prop_map(Principal::Meta),
            name().prop_map(Principal::Mgmt),
            name().prop_map(Principal::Client),
            (name(), any::<u32>(), any::<u32>()).prop_map(|(name, uid, gid)| Principal::Admin {
                name,
                uid,
                gid
            }),
        ]
    }

    proptest! {
        #[test]
        fn identities_round_trip_through_their_uri(cluster in name(), principal in principal()) {
            let identity = Identity::new(&cluster, principal).expect("valid names");
            let uri = identity.to_uri();
            prop_assert!(uri.len() <= URI_LEN_MAX);
            prop_assert_eq!(Identity::parse_uri(&uri), Ok(identity));
        }

        #[test]
        fn parsing_never_panics(text in "\\PC{0,300}") {
            let _ = Identity::parse_uri(&text);
            let _ = Identity::parse_uri(&format!("flyfs://{text}"));
        }
    }
}

//! Extended attributes: one `XATR` key per attribute, so that setting one
//! never rewrites the inode (and never conflicts with a length update).
//!
//! Every name is treated like Linux treats `user.*` names, whatever its
//! prefix (the namespace has no trusted or security attributes): reading
//! needs read permission, writing needs write permission; symlinks carry
//! none (get ENODATA, set EPERM); in a sticky directory only its owner or
//! root may write them. Limits and errno are Linux's: names of 1..=255
//! bytes (ERANGE otherwise), values up to 65536 bytes (E2BIG).

use flyfs_proto::ids::InodeId;
use flyfs_proto::wire::meta::User;

use super::Namespace;
use crate::ns::NsError;
use crate::ns::perm;
use crate::schema::{
    Inode, InodeKind, XATTR_NAME_BYTES_MAX, XATTR_VALUE_BYTES_MAX, decode_xattr, encode_xattr,
    xattr_key, xattr_prefix,
};
use flyfs_kv::{Kv, RangeOptions, Transaction};

/// `setxattr` flags, as one value so that "both" cannot be asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XattrMode {
    /// Create or replace.
    #[default]
    Upsert,
    /// `XATTR_CREATE`: EEXIST if it exists.
    Create,
    /// `XATTR_REPLACE`: ENODATA if it does not.
    Replace,
}

fn check_xattr_name(name: &[u8]) -> Result<(), NsError> {
    if name.is_empty() || name.len() > XATTR_NAME_BYTES_MAX {
        return Err(NsError::Range(format!(
            "an attribute name of {} bytes",
            name.len()
        )));
    }
    if name.contains(&0) {
        return Err(NsError::Invalid("an attribute name containing NUL".into()));
    }
    Ok(())
}

fn show(name: &[u8]) -> String {
    super::show(name)
}

/// May `user` change the attributes of `inode`?
fn check_write(inode: &Inode, user: &User) -> Result<(), NsError> {
    if inode.kind() == InodeKind::Symlink {
        return Err(NsError::NotPermitted(format!(
            "attributes of symlink {:?}",
            inode.ino
        )));
    }
    if inode.is_dir() && inode.mode & perm::S_ISVTX != 0 && !perm::owns_or_root(user, inode) {
        return Err(NsError::NotPermitted(format!(
            "attributes of sticky directory {:?}",
            inode.ino
        )));
    }
    perm::check(inode, user, perm::MAY_WRITE, "set an attribute")
}

impl<K: Kv> Namespace<K> {
    /// The value of attribute `name` of `ino` (ENODATA when absent).
    pub async fn get_xattr(
        &self,
        user: &User,
        ino: InodeId,
        name: &[u8],
    ) -> Result<Vec<u8>, NsError> {
        check_xattr_name(name)?;
        self.read(|tx| async move {
            let inode = tx.existing(ino).await?;
            if inode.kind() == InodeKind::Symlink {
                return Err(NsError::NoData(show(name)));
            }
            perm::check(&inode, user, perm::MAY_READ, "read an attribute")?;
            let key = xattr_key(ino, name);
            match tx.tx.get(&key, false).await? {
                Some(value) => Ok(decode_xattr(&key, &value)?),
                None => Err(NsError::NoData(show(name))),
            }
        })
        .await
    }

    /// Sets attribute `name` of `ino` to `value`.
    pub async fn set_xattr(
        &self,
        user: &User,
        ino: InodeId,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
    ) -> Result<(), NsError> {
        check_xattr_name(name)?;
        if value.len() > XATTR_VALUE_BYTES_MAX {
            return Err(NsError::TooBig(format!(
                "an attribute value of {} bytes",
                value.len()
            )));
        }
        self.write(|tx| async move {
            let inode = tx.existing(ino).await?;
            check_write(&inode, user)?;
            let key = xattr_key(ino, name);
            let exists = tx.tx.get(&key, false).await?.is_some();
            match mode {
                XattrMode::Create if exists => return Err(NsError::Exists(show(name))),
                XattrMode::Replace if !exists => return Err(NsError::NoData(show(name))),
                _ => {}
            }
            tx.tx.set(&key, &encode_xattr(value)?)?;
            Ok(())
        })
        .await
    }

    /// The names of every attribute of `ino`, sorted. Needs no permission
    /// (as on Linux, where the path walk already checked search).
    pub async fn list_xattr(&self, ino: InodeId) -> Result<Vec<Vec<u8>>, NsError> {
        self.read(|tx| async move {
            tx.existing(ino).await?;
            let prefix = xattr_prefix(ino);
            let result = tx.tx.get_range(&RangeOptions::prefix(&prefix)).await?;
            Ok(result
                .kvs
                .iter()
                .map(|kv| kv.key.get(prefix.len()..).unwrap_or_default().to_vec())
                .collect())
        })
        .await
    }

    /// Removes attribute `name` of `ino` (ENODATA when absent).
    pub async fn remove_xattr(
        &self,
        user: &User,
        ino: InodeId,
        name: &[u8],
    ) -> Result<(), NsError> {
        check_xattr_name(name)?;
        self.write(|tx| async move {
            let inode = tx.existing(ino).await?;
            check_write(&inode, user)?;
            let key = xattr_key(ino, name);
            if tx.tx.get(&key, false).await?.is_none() {
                return Err(NsError::NoData(show(name)));
            }
            tx.tx.clear(&key)?;
            Ok(())
        })
        .await
    }
}

//! The C ABI of `include/flyfs_usrbio.h`. Each function checks its pointers
//! for null (an `-EINVAL` with a message, never a crash on a null), turns
//! the library's errors into `-errno`, and never lets a panic cross into C
//! (it becomes `-EIO`).

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use flyfs_usrbio::{Client, Completion, Ior, Iov, NativeError, RegisteredFile};

/// `struct flyfs_completion`.
#[repr(C)]
#[derive(Debug)]
pub struct FlyfsCompletion {
    pub user_data: u64,
    pub result: i64,
}

#[derive(Debug)]
pub struct FlyfsClient(Client);
#[derive(Debug)]
pub struct FlyfsIov(Iov);
#[derive(Debug)]
pub struct FlyfsIor {
    ior: Ior,
    /// The last error text handed out, kept alive until the next call.
    error: CString,
    completions: Vec<Completion>,
}
#[derive(Debug)]
pub struct FlyfsFile(RegisteredFile);

const EINVAL: i32 = 22;
const EIO: i32 = 5;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(message: String) {
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = text);
}

fn fail(errno: i32, message: String) -> c_int {
    set_error(message);
    -errno
}

fn native(e: NativeError) -> c_int {
    let errno = e.errno().unwrap_or(EIO);
    fail(errno, e.to_string())
}

/// Runs `body`, turning a panic into `-EIO`.
fn guard(body: impl FnOnce() -> c_int) -> c_int {
    catch_unwind(AssertUnwindSafe(body))
        .unwrap_or_else(|_| fail(EIO, "flyfs: internal error (a bug)".into()))
}

fn null(what: &str) -> c_int {
    fail(EINVAL, format!("{what} is NULL"))
}

#[unsafe(no_mangle)]
pub extern "C" fn flyfs_last_error() -> *const c_char {
    LAST_ERROR.with(|last| last.borrow().as_ptr())
}

/// # Safety
/// `socket_path` is a NUL-terminated string; `out` points at writable memory.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_connect(
    socket_path: *const c_char,
    out: *mut *mut FlyfsClient,
) -> c_int {
    guard(|| {
        if socket_path.is_null() {
            return null("socket_path");
        }
        if out.is_null() {
            return null("out");
        }
        // SAFETY: a NUL-terminated string, by the header's contract.
        let path = unsafe { CStr::from_ptr(socket_path) };
        let Ok(path) = path.to_str() else {
            return fail(EINVAL, "socket_path is not UTF-8".into());
        };
        match Client::connect(path) {
            Ok(client) => {
                // SAFETY: `out` is writable, by the header's contract.
                unsafe { *out = Box::into_raw(Box::new(FlyfsClient(client))) };
                0
            }
            Err(e) => native(e),
        }
    })
}

/// # Safety
/// `client` came from `flyfs_connect` and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_client_free(client: *mut FlyfsClient) {
    if !client.is_null() {
        // SAFETY: made by Box::into_raw in flyfs_connect, freed once.
        drop(unsafe { Box::from_raw(client) });
    }
}

/// # Safety
/// `client` came from `flyfs_connect`; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_iov_create(
    client: *mut FlyfsClient,
    size: u64,
    out: *mut *mut FlyfsIov,
) -> c_int {
    guard(|| {
        // SAFETY: a live client, by the header's contract.
        let Some(client) = (unsafe { client.as_ref() }) else {
            return null("client");
        };
        if out.is_null() {
            return null("out");
        }
        match client.0.register_iov(size) {
            Ok(iov) => {
                // SAFETY: `out` is writable.
                unsafe { *out = Box::into_raw(Box::new(FlyfsIov(iov))) };
                0
            }
            Err(e) => native(e),
        }
    })
}

/// # Safety
/// `iov` came from `flyfs_iov_create` (or is NULL).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_iov_base(iov: *const FlyfsIov) -> *mut u8 {
    // SAFETY: a live iov or NULL.
    unsafe { iov.as_ref() }.map_or(std::ptr::null_mut(), |iov| iov.0.as_ptr())
}

/// # Safety
/// `iov` came from `flyfs_iov_create` (or is NULL).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_iov_size(iov: *const FlyfsIov) -> u64 {
    // SAFETY: a live iov or NULL.
    unsafe { iov.as_ref() }.map_or(0, |iov| iov.0.len())
}

/// # Safety
/// `iov` came from `flyfs_iov_create` and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_iov_free(iov: *mut FlyfsIov) {
    if !iov.is_null() {
        // SAFETY: made by Box::into_raw, freed once.
        drop(unsafe { Box::from_raw(iov) });
    }
}

/// # Safety
/// `client` came from `flyfs_connect`; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_ior_create(
    client: *mut FlyfsClient,
    entries: u32,
    out: *mut *mut FlyfsIor,
) -> c_int {
    guard(|| {
        // SAFETY: a live client.
        let Some(client) = (unsafe { client.as_ref() }) else {
            return null("client");
        };
        if out.is_null() {
            return null("out");
        }
        match client.0.create_ior(entries) {
            Ok(ior) => {
                let ior = FlyfsIor {
                    ior,
                    error: CString::default(),
                    completions: Vec::new(),
                };
                // SAFETY: `out` is writable.
                unsafe { *out = Box::into_raw(Box::new(ior)) };
                0
            }
            Err(e) => native(e),
        }
    })
}

/// # Safety
/// `ior` came from `flyfs_ior_create` and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_ior_free(ior: *mut FlyfsIor) {
    if !ior.is_null() {
        // SAFETY: made by Box::into_raw, freed once.
        drop(unsafe { Box::from_raw(ior) });
    }
}

/// # Safety
/// `ior` came from `flyfs_ior_create`, used by this thread only.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_ior_last_error(ior: *mut FlyfsIor) -> *const c_char {
    // SAFETY: a live ior, this thread's.
    let Some(ior) = (unsafe { ior.as_mut() }) else {
        return c"".as_ptr();
    };
    ior.error = CString::new(ior.ior.last_error().replace('\0', " ")).unwrap_or_default();
    ior.error.as_ptr()
}

/// # Safety
/// `client` came from `flyfs_connect`; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_file_register(
    client: *mut FlyfsClient,
    fd: c_int,
    out: *mut *mut FlyfsFile,
) -> c_int {
    guard(|| {
        // SAFETY: a live client.
        let Some(client) = (unsafe { client.as_ref() }) else {
            return null("client");
        };
        if out.is_null() {
            return null("out");
        }
        let file = match flyfs_usrbio::os::duplicate(fd) {
            Ok(file) => file,
            Err(e) => {
                return fail(
                    e.raw_os_error().unwrap_or(EINVAL),
                    format!("file descriptor {fd}: {e}"),
                );
            }
        };
        match client.0.register_file(std::os::fd::AsFd::as_fd(&file)) {
            Ok(registered) => {
                // SAFETY: `out` is writable.
                unsafe { *out = Box::into_raw(Box::new(FlyfsFile(registered))) };
                0
            }
            Err(e) => native(e),
        }
    })
}

/// # Safety
/// `file` came from `flyfs_file_register` (or is NULL).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_file_length(file: *const FlyfsFile) -> u64 {
    // SAFETY: a live file or NULL.
    unsafe { file.as_ref() }.map_or(0, |file| file.0.length_at_open())
}

/// # Safety
/// `file` came from `flyfs_file_register` and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_file_close(file: *mut FlyfsFile) -> c_int {
    guard(|| {
        if file.is_null() {
            return null("file");
        }
        // SAFETY: made by Box::into_raw, freed once.
        let file = unsafe { Box::from_raw(file) };
        match file.0.close() {
            Ok(()) => 0,
            Err(e) => native(e),
        }
    })
}

enum Prep {
    Read,
    Write,
}

/// # Safety
/// Live objects from this library, the ior used by this thread only.
// The C functions' own arguments, passed through as the header has them.
#[allow(clippy::too_many_arguments)]
unsafe fn prep(
    kind: Prep,
    ior: *mut FlyfsIor,
    file: *const FlyfsFile,
    iov: *const FlyfsIov,
    iov_offset: u64,
    len: u32,
    file_offset: u64,
    user_data: u64,
) -> c_int {
    guard(|| {
        // SAFETY: live objects, by the header's contract.
        let (Some(ior), Some(file), Some(iov)) =
            (unsafe { ior.as_mut() }, unsafe { file.as_ref() }, unsafe {
                iov.as_ref()
            })
        else {
            return null("ior, file or iov");
        };
        let prepared = match kind {
            Prep::Read => {
                ior.ior
                    .prepare_read(&file.0, &iov.0, iov_offset, len, file_offset, user_data)
            }
            Prep::Write => {
                ior.ior
                    .prepare_write(&file.0, &iov.0, iov_offset, len, file_offset, user_data)
            }
        };
        prepared.map_or_else(native, |()| 0)
    })
}

/// # Safety
/// See `prep`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_prep_read(
    ior: *mut FlyfsIor,
    file: *const FlyfsFile,
    iov: *const FlyfsIov,
    iov_offset: u64,
    len: u32,
    file_offset: u64,
    user_data: u64,
) -> c_int {
    // SAFETY: the caller's contract is prep's.
    unsafe {
        prep(
            Prep::Read,
            ior,
            file,
            iov,
            iov_offset,
            len,
            file_offset,
            user_data,
        )
    }
}

/// # Safety
/// See `prep`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_prep_write(
    ior: *mut FlyfsIor,
    file: *const FlyfsFile,
    iov: *const FlyfsIov,
    iov_offset: u64,
    len: u32,
    file_offset: u64,
    user_data: u64,
) -> c_int {
    // SAFETY: the caller's contract is prep's.
    unsafe {
        prep(
            Prep::Write,
            ior,
            file,
            iov,
            iov_offset,
            len,
            file_offset,
            user_data,
        )
    }
}

/// # Safety
/// Live objects from this library, the ior used by this thread only.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_prep_flush(
    ior: *mut FlyfsIor,
    file: *const FlyfsFile,
    user_data: u64,
) -> c_int {
    guard(|| {
        // SAFETY: live objects.
        let (Some(ior), Some(file)) = (unsafe { ior.as_mut() }, unsafe { file.as_ref() }) else {
            return null("ior or file");
        };
        ior.ior
            .prepare_flush(&file.0, user_data)
            .map_or_else(native, |()| 0)
    })
}

/// # Safety
/// A live ior, used by this thread only.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_submit(ior: *mut FlyfsIor) -> c_int {
    guard(|| {
        // SAFETY: a live ior.
        let Some(ior) = (unsafe { ior.as_mut() }) else {
            return null("ior");
        };
        ior.ior.submit().map_or_else(native, |n| n as c_int)
    })
}

/// # Safety
/// A live ior, used by this thread only; `out` has room for `max` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn flyfs_wait(
    ior: *mut FlyfsIor,
    out: *mut FlyfsCompletion,
    max: c_int,
    min: c_int,
    timeout_ms: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: a live ior.
        let Some(ior) = (unsafe { ior.as_mut() }) else {
            return null("ior");
        };
        if out.is_null() && max > 0 {
            return null("out");
        }
        if min < 0 || max < min {
            return fail(
                EINVAL,
                format!("min {min} and max {max}: need 0 <= min <= max"),
            );
        }
        let timeout = (timeout_ms >= 0).then(|| Duration::from_millis(timeout_ms as u64));
        ior.completions.clear();
        let mut completions = std::mem::take(&mut ior.completions);
        let waited = ior
            .ior
            .wait_up_to(&mut completions, min as usize, max as usize, timeout);
        let result = match waited {
            Ok(count) => {
                for (i, completion) in completions.iter().enumerate() {
                    // SAFETY: `out` has room for `max` entries and `count <= max`.
                    unsafe {
                        out.add(i).write(FlyfsCompletion {
                            user_data: completion.user_data,
                            result: completion.result,
                        })
                    };
                }
                count as c_int
            }
            Err(e) => native(e),
        };
        ior.completions = completions;
        result
    })
}

//! NVMe completion statuses as a typed value with a readable name: what a
//! failed command's [`DeviceError::Command`](crate::DeviceError::Command)
//! carries, so an operator reads "unrecovered read error" rather than a
//! pair of numbers, and code can branch on the type and code.

use std::fmt;

use flyfs_sys::nvme::{CompletionEntry, status};

/// The status of a completed NVMe command that did not succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmeStatus {
    /// Status Code Type: 0 generic, 1 command specific, 2 media and data
    /// integrity, 3 path related, 7 vendor specific.
    pub code_type: u8,
    /// Status Code, meaningful within its type.
    pub code: u8,
    /// The controller says retrying the command will fail the same way.
    pub do_not_retry: bool,
}

impl NvmeStatus {
    /// The status of a completion, `None` when it succeeded.
    pub fn of(entry: &CompletionEntry) -> Option<NvmeStatus> {
        let code_type = entry.status_code_type();
        let code = entry.status_code();
        if code_type == status::SCT_GENERIC && code == status::SUCCESS {
            return None;
        }
        Some(NvmeStatus {
            code_type,
            code,
            do_not_retry: entry.do_not_retry(),
        })
    }

    /// The command was aborted on the driver's request (after its timeout).
    pub fn is_abort_requested(&self) -> bool {
        self.code_type == status::SCT_GENERIC && self.code == status::ABORT_REQUESTED
    }

    /// The specification's name for the status, where the driver knows it.
    pub fn name(&self) -> &'static str {
        match (self.code_type, self.code) {
            (status::SCT_GENERIC, status::INVALID_OPCODE) => "invalid command opcode",
            (status::SCT_GENERIC, status::INVALID_FIELD) => "invalid field in command",
            (status::SCT_GENERIC, status::COMMAND_ID_CONFLICT) => "command id conflict",
            (status::SCT_GENERIC, status::DATA_TRANSFER_ERROR) => "data transfer error",
            (status::SCT_GENERIC, status::ABORTED_POWER_LOSS) => {
                "commands aborted due to power loss notification"
            }
            (status::SCT_GENERIC, status::INTERNAL_ERROR) => "internal error",
            (status::SCT_GENERIC, status::ABORT_REQUESTED) => "command abort requested",
            (status::SCT_GENERIC, status::ABORTED_SQ_DELETION) => {
                "command aborted due to submission queue deletion"
            }
            (status::SCT_GENERIC, status::INVALID_NAMESPACE_OR_FORMAT) => {
                "invalid namespace or format"
            }
            (status::SCT_GENERIC, status::INVALID_PRP_OFFSET) => "PRP offset invalid",
            (status::SCT_GENERIC, status::LBA_OUT_OF_RANGE) => "LBA out of range",
            (status::SCT_GENERIC, status::CAPACITY_EXCEEDED) => "capacity exceeded",
            (status::SCT_GENERIC, status::NAMESPACE_NOT_READY) => "namespace not ready",
            (status::SCT_MEDIA, status::WRITE_FAULT) => "write fault",
            (status::SCT_MEDIA, status::UNRECOVERED_READ_ERROR) => "unrecovered read error",
            (status::SCT_MEDIA, status::ACCESS_DENIED) => "access denied",
            (status::SCT_MEDIA, status::DEALLOCATED_OR_UNWRITTEN) => {
                "deallocated or unwritten logical block"
            }
            (status::SCT_GENERIC, _) => "generic command error",
            (status::SCT_COMMAND_SPECIFIC, _) => "command specific error",
            (status::SCT_MEDIA, _) => "media and data integrity error",
            (status::SCT_PATH, _) => "path related error",
            (status::SCT_VENDOR, _) => "vendor specific error",
            _ => "reserved status code type",
        }
    }
}

impl fmt::Display for NvmeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (status code type {}, status code {:#04x}{})",
            self.name(),
            self.code_type,
            self.code,
            if self.do_not_retry {
                ", do not retry"
            } else {
                ""
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(code_type: u16, code: u16, do_not_retry: bool) -> CompletionEntry {
        CompletionEntry {
            status: 1 | code << 1 | code_type << 9 | u16::from(do_not_retry) << 15,
            ..CompletionEntry::default()
        }
    }

    #[test]
    fn success_is_no_status() {
        assert_eq!(NvmeStatus::of(&entry(0, 0, false)), None);
    }

    #[test]
    fn statuses_are_named() {
        let read_error = NvmeStatus::of(&entry(2, 0x81, true)).expect("an error");
        assert_eq!(
            read_error.to_string(),
            "unrecovered read error (status code type 2, status code 0x81, do not retry)"
        );
        let out_of_range = NvmeStatus::of(&entry(0, 0x80, false)).expect("an error");
        assert_eq!(out_of_range.name(), "LBA out of range");
        let aborted = NvmeStatus::of(&entry(0, 0x07, false)).expect("an error");
        assert!(aborted.is_abort_requested());
        let unknown = NvmeStatus::of(&entry(1, 0x42, false)).expect("an error");
        assert_eq!(unknown.name(), "command specific error");
        assert_eq!(
            NvmeStatus::of(&entry(5, 1, false))
                .expect("an error")
                .name(),
            "reserved status code type"
        );
    }
}

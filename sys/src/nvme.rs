//! NVMe structures from the NVM Express Base Specification (revision 1.4),
//! written by hand: the controller registers a driver touches, the 64-byte
//! submission and 16-byte completion queue entries, the Identify data it
//! reads, and the opcodes and status codes it uses.
//!
//! There is no C header to generate these from (the kernel's
//! `linux/nvme.h` is not exported to userspace), so they are transcribed
//! from the specification, and every size and field offset is asserted at
//! compile time against the specification's byte numbers. Raw definitions
//! only: the driver that makes them safe to use is flyfs-bypass's `nvme`.
//!
//! Every multi-byte field is little-endian on the wire and in memory; the
//! structs are only ever used on little-endian hosts (flyfs-bypass refuses
//! to build its driver elsewhere).

use core::mem::{offset_of, size_of};

/// Controller register offsets in BAR0 (specification section 3.1).
pub mod reg {
    /// Controller Capabilities, 64 bits.
    pub const CAP: usize = 0x00;
    /// Version, 32 bits: major in 31:16, minor in 15:8, tertiary in 7:0.
    pub const VS: usize = 0x08;
    /// Interrupt Mask Set, 32 bits.
    pub const INTMS: usize = 0x0c;
    /// Interrupt Mask Clear, 32 bits.
    pub const INTMC: usize = 0x10;
    /// Controller Configuration, 32 bits.
    pub const CC: usize = 0x14;
    /// Controller Status, 32 bits.
    pub const CSTS: usize = 0x1c;
    /// Admin Queue Attributes, 32 bits: ACQS (0-based) in 27:16, ASQS in 11:0.
    pub const AQA: usize = 0x24;
    /// Admin Submission Queue base address, 64 bits.
    pub const ASQ: usize = 0x28;
    /// Admin Completion Queue base address, 64 bits.
    pub const ACQ: usize = 0x30;
    /// The first doorbell (submission queue 0 tail); doorbells follow at a
    /// stride of `4 << CAP.DSTRD` bytes: SQ y tail at `2y`, CQ y head at `2y + 1`.
    pub const DOORBELLS: usize = 0x1000;
}

/// Bit fields of CAP (Controller Capabilities).
pub mod cap {
    /// Maximum Queue Entries Supported, 0-based, bits 15:0.
    pub fn mqes(cap: u64) -> u32 {
        (cap & 0xffff) as u32
    }
    /// Contiguous Queues Required, bit 16.
    pub fn cqr(cap: u64) -> bool {
        cap >> 16 & 1 == 1
    }
    /// Timeout, bits 31:24, in units of 500 ms: the worst case time to wait
    /// for CSTS.RDY to change after CC.EN changes.
    pub fn to(cap: u64) -> u32 {
        (cap >> 24 & 0xff) as u32
    }
    /// Doorbell Stride, bits 35:32: doorbells are `4 << DSTRD` bytes apart.
    pub fn dstrd(cap: u64) -> u32 {
        (cap >> 32 & 0xf) as u32
    }
    /// Command Sets Supported, bits 44:37; bit 0 of it is the NVM command set.
    pub fn css(cap: u64) -> u32 {
        (cap >> 37 & 0xff) as u32
    }
    /// Memory Page Size Minimum, bits 51:48: pages of `2 ^ (12 + MPSMIN)` bytes.
    pub fn mpsmin(cap: u64) -> u32 {
        (cap >> 48 & 0xf) as u32
    }
    /// Memory Page Size Maximum, bits 55:52.
    pub fn mpsmax(cap: u64) -> u32 {
        (cap >> 52 & 0xf) as u32
    }
}

/// Bit fields of CC (Controller Configuration).
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1;
    /// I/O Command Set Selected, bits 6:4: 0 is the NVM command set.
    pub const CSS_NVM: u32 = 0 << 4;
    /// Memory Page Size, bits 10:7: pages of `2 ^ (12 + MPS)` bytes.
    pub const MPS_SHIFT: u32 = 7;
    /// Arbitration Mechanism Selected, bits 13:11: 0 is round robin.
    pub const AMS_ROUND_ROBIN: u32 = 0 << 11;
    /// Shutdown Notification, bits 15:14.
    pub const SHN_MASK: u32 = 3 << 14;
    /// Normal shutdown notification.
    pub const SHN_NORMAL: u32 = 1 << 14;
    /// Abrupt shutdown notification.
    pub const SHN_ABRUPT: u32 = 2 << 14;
    /// I/O Submission Queue Entry Size, bits 19:16, as a power of two.
    pub const IOSQES_SHIFT: u32 = 16;
    /// I/O Completion Queue Entry Size, bits 23:20, as a power of two.
    pub const IOCQES_SHIFT: u32 = 20;
}

/// Bit fields of CSTS (Controller Status).
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1;
    /// Controller Fatal Status.
    pub const CFS: u32 = 1 << 1;
    /// Shutdown Status, bits 3:2.
    pub const SHST_MASK: u32 = 3 << 2;
    /// Shutdown processing complete.
    pub const SHST_COMPLETE: u32 = 2 << 2;
}

/// Admin command opcodes (section 5).
pub mod admin {
    pub const DELETE_IO_SQ: u8 = 0x00;
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_IO_CQ: u8 = 0x04;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    /// Feature identifier of Number of Queues (Set/Get Features, cdw10).
    pub const FEATURE_NUMBER_OF_QUEUES: u8 = 0x07;

    /// Identify CDW10.CNS: the namespace data structure for CDW1's NSID.
    pub const CNS_NAMESPACE: u32 = 0x00;
    /// Identify CDW10.CNS: the controller data structure.
    pub const CNS_CONTROLLER: u32 = 0x01;

    /// Create I/O queue CDW11 bit 0: Physically Contiguous.
    pub const QUEUE_PHYSICALLY_CONTIGUOUS: u32 = 1;
}

/// NVM command set I/O opcodes (section 6 of the base specification,
/// the NVM Command Set).
pub mod io {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;

    /// Dataset Management CDW11 bit 2: Attribute - Deallocate.
    pub const DSM_DEALLOCATE: u32 = 1 << 2;
    /// Most ranges one Dataset Management command may carry (NR is 8 bits, 0-based).
    pub const DSM_RANGES_MAX: usize = 256;
}

/// Status Code Types and the Status Codes a driver tells apart (section 4.6.1).
pub mod status {
    pub const SCT_GENERIC: u8 = 0;
    pub const SCT_COMMAND_SPECIFIC: u8 = 1;
    pub const SCT_MEDIA: u8 = 2;
    pub const SCT_PATH: u8 = 3;
    pub const SCT_VENDOR: u8 = 7;

    // Generic Command Status.
    pub const SUCCESS: u8 = 0x00;
    pub const INVALID_OPCODE: u8 = 0x01;
    pub const INVALID_FIELD: u8 = 0x02;
    pub const COMMAND_ID_CONFLICT: u8 = 0x03;
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    pub const ABORTED_POWER_LOSS: u8 = 0x05;
    pub const INTERNAL_ERROR: u8 = 0x06;
    pub const ABORT_REQUESTED: u8 = 0x07;
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    pub const INVALID_NAMESPACE_OR_FORMAT: u8 = 0x0b;
    pub const INVALID_PRP_OFFSET: u8 = 0x13;
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    pub const CAPACITY_EXCEEDED: u8 = 0x81;
    pub const NAMESPACE_NOT_READY: u8 = 0x82;

    // Media and Data Integrity Errors.
    pub const WRITE_FAULT: u8 = 0x80;
    pub const UNRECOVERED_READ_ERROR: u8 = 0x81;
    pub const ACCESS_DENIED: u8 = 0x86;
    pub const DEALLOCATED_OR_UNWRITTEN: u8 = 0x87;
}

/// Identify Controller VWC bit 0: a volatile write cache is present.
pub const VWC_PRESENT: u8 = 1;
/// Identify Controller ONCS bit 2: Dataset Management is supported.
pub const ONCS_DATASET_MANAGEMENT: u16 = 1 << 2;
/// Identify Controller ONCS bit 3: Write Zeroes is supported.
pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;

/// A submission queue entry (section 4.2): 64 bytes, in the command
/// layout common to the admin and NVM command sets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubmissionEntry {
    /// Command Dword 0: opcode in 7:0, fused operation in 9:8, PRP or SGL
    /// in 15:14, command identifier in 31:16.
    pub cdw0: u32,
    /// Namespace Identifier.
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    /// Metadata Pointer.
    pub mptr: u64,
    /// Data Pointer, PRP Entry 1.
    pub prp1: u64,
    /// Data Pointer, PRP Entry 2 (a second page, or a PRP list).
    pub prp2: u64,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

impl SubmissionEntry {
    /// An entry with the opcode and command identifier set, the rest zero.
    pub const fn new(opcode: u8, command_id: u16) -> SubmissionEntry {
        SubmissionEntry {
            cdw0: opcode as u32 | (command_id as u32) << 16,
            nsid: 0,
            cdw2: 0,
            cdw3: 0,
            mptr: 0,
            prp1: 0,
            prp2: 0,
            cdw10: 0,
            cdw11: 0,
            cdw12: 0,
            cdw13: 0,
            cdw14: 0,
            cdw15: 0,
        }
    }

    pub const fn opcode(&self) -> u8 {
        self.cdw0 as u8
    }

    pub const fn command_id(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }
}

/// A completion queue entry (section 4.6): 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompletionEntry {
    /// Command specific result (Dword 0).
    pub dw0: u32,
    pub dw1: u32,
    /// Submission Queue Head Pointer: how far the controller has consumed.
    pub sq_head: u16,
    /// Submission Queue Identifier.
    pub sq_id: u16,
    /// Command Identifier of the completed command.
    pub command_id: u16,
    /// Phase Tag in bit 0, Status Code in 8:1, Status Code Type in 11:9,
    /// Command Retry Delay in 13:12, More in 14, Do Not Retry in 15.
    pub status: u16,
}

impl CompletionEntry {
    pub const fn phase(&self) -> bool {
        self.status & 1 == 1
    }
    /// Status Code.
    pub const fn status_code(&self) -> u8 {
        (self.status >> 1) as u8
    }
    /// Status Code Type.
    pub const fn status_code_type(&self) -> u8 {
        (self.status >> 9 & 0x7) as u8
    }
    /// Do Not Retry.
    pub const fn do_not_retry(&self) -> bool {
        self.status >> 15 & 1 == 1
    }
}

/// One range of a Dataset Management command (section 6.7, figure 364).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DsmRange {
    pub context_attributes: u32,
    /// Length in logical blocks (not 0-based).
    pub length_lbas: u32,
    pub starting_lba: u64,
}

/// The Identify Controller data structure (CNS 01h, section 5.15.2.1), with
/// the fields a driver uses; the rest is kept as opaque bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IdentifyController {
    /// PCI Vendor ID.
    pub vid: u16,
    /// PCI Subsystem Vendor ID.
    pub ssvid: u16,
    /// Serial Number, ASCII, space padded.
    pub sn: [u8; 20],
    /// Model Number, ASCII, space padded.
    pub mn: [u8; 40],
    /// Firmware Revision, ASCII, space padded.
    pub fr: [u8; 8],
    /// Recommended Arbitration Burst.
    pub rab: u8,
    pub ieee: [u8; 3],
    pub cmic: u8,
    /// Maximum Data Transfer Size: `2 ^ MDTS` minimum memory pages
    /// (CAP.MPSMIN); 0 means no limit.
    pub mdts: u8,
    /// Controller ID.
    pub cntlid: u16,
    /// Version (as VS).
    pub ver: u32,
    pub reserved_84: [u8; 172],
    /// Optional Admin Command Support.
    pub oacs: u16,
    /// Abort Command Limit, 0-based.
    pub acl: u8,
    pub reserved_259: [u8; 253],
    /// Submission Queue Entry Size: required (3:0) and maximum (7:4), as powers of two.
    pub sqes: u8,
    /// Completion Queue Entry Size: required (3:0) and maximum (7:4).
    pub cqes: u8,
    /// Maximum Outstanding Commands.
    pub maxcmd: u16,
    /// Number of Namespaces.
    pub nn: u32,
    /// Optional NVM Command Support.
    pub oncs: u16,
    /// Fused Operation Support.
    pub fuses: u16,
    /// Format NVM Attributes.
    pub fna: u8,
    /// Volatile Write Cache.
    pub vwc: u8,
    /// Atomic Write Unit Normal, 0-based logical blocks.
    pub awun: u16,
    /// Atomic Write Unit Power Fail, 0-based logical blocks.
    pub awupf: u16,
    pub nvscc: u8,
    pub nwpc: u8,
    pub acwu: u16,
    pub reserved_534: [u8; 2],
    /// SGL Support.
    pub sgls: u32,
    pub reserved_540: [u8; 3556],
}

/// One LBA Format Data Structure (figure 250).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbaFormat {
    /// Metadata Size in bytes.
    pub ms: u16,
    /// LBA Data Size, as a power of two (9 is 512 bytes).
    pub lbads: u8,
    /// Relative Performance in bits 1:0.
    pub rp: u8,
}

/// The Identify Namespace data structure (CNS 00h, section 5.15.2.2), with
/// the fields a driver uses.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IdentifyNamespace {
    /// Namespace Size in logical blocks.
    pub nsze: u64,
    /// Namespace Capacity in logical blocks.
    pub ncap: u64,
    /// Namespace Utilization in logical blocks.
    pub nuse: u64,
    pub nsfeat: u8,
    /// Number of LBA Formats, 0-based.
    pub nlbaf: u8,
    /// Formatted LBA Size: the index of the LBA format in use in bits 3:0.
    pub flbas: u8,
    pub mc: u8,
    pub dpc: u8,
    pub dps: u8,
    pub nmic: u8,
    pub rescap: u8,
    pub fpi: u8,
    pub dlfeat: u8,
    pub reserved_34: [u8; 94],
    pub lbaf: [LbaFormat; 16],
    pub reserved_192: [u8; 3904],
}

const _: () = {
    assert!(size_of::<SubmissionEntry>() == 64);
    assert!(offset_of!(SubmissionEntry, nsid) == 4);
    assert!(offset_of!(SubmissionEntry, mptr) == 16);
    assert!(offset_of!(SubmissionEntry, prp1) == 24);
    assert!(offset_of!(SubmissionEntry, prp2) == 32);
    assert!(offset_of!(SubmissionEntry, cdw10) == 40);
    assert!(offset_of!(SubmissionEntry, cdw15) == 60);

    assert!(size_of::<CompletionEntry>() == 16);
    assert!(offset_of!(CompletionEntry, sq_head) == 8);
    assert!(offset_of!(CompletionEntry, sq_id) == 10);
    assert!(offset_of!(CompletionEntry, command_id) == 12);
    assert!(offset_of!(CompletionEntry, status) == 14);

    assert!(size_of::<DsmRange>() == 16);
    assert!(offset_of!(DsmRange, length_lbas) == 4);
    assert!(offset_of!(DsmRange, starting_lba) == 8);

    assert!(size_of::<IdentifyController>() == 4096);
    assert!(offset_of!(IdentifyController, sn) == 4);
    assert!(offset_of!(IdentifyController, mn) == 24);
    assert!(offset_of!(IdentifyController, fr) == 64);
    assert!(offset_of!(IdentifyController, mdts) == 77);
    assert!(offset_of!(IdentifyController, cntlid) == 78);
    assert!(offset_of!(IdentifyController, ver) == 80);
    assert!(offset_of!(IdentifyController, oacs) == 256);
    assert!(offset_of!(IdentifyController, acl) == 258);
    assert!(offset_of!(IdentifyController, sqes) == 512);
    assert!(offset_of!(IdentifyController, cqes) == 513);
    assert!(offset_of!(IdentifyController, maxcmd) == 514);
    assert!(offset_of!(IdentifyController, nn) == 516);
    assert!(offset_of!(IdentifyController, oncs) == 520);
    assert!(offset_of!(IdentifyController, vwc) == 525);
    assert!(offset_of!(IdentifyController, awupf) == 528);
    assert!(offset_of!(IdentifyController, sgls) == 536);

    assert!(size_of::<LbaFormat>() == 4);
    assert!(size_of::<IdentifyNamespace>() == 4096);
    assert!(offset_of!(IdentifyNamespace, ncap) == 8);
    assert!(offset_of!(IdentifyNamespace, nlbaf) == 25);
    assert!(offset_of!(IdentifyNamespace, flbas) == 26);
    assert!(offset_of!(IdentifyNamespace, dlfeat) == 33);
    assert!(offset_of!(IdentifyNamespace, lbaf) == 128);
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The CAP value QEMU 7.2's controller reports (see shared/vm/README.md).
    const QEMU_CAP: u64 = 0x0040_1820_0f01_07ff;

    #[test]
    fn cap_fields_decode_qemus_controller() {
        assert_eq!(cap::mqes(QEMU_CAP), 0x7ff);
        assert!(cap::cqr(QEMU_CAP));
        assert_eq!(cap::to(QEMU_CAP), 0x0f);
        assert_eq!(cap::dstrd(QEMU_CAP), 0);
        assert_eq!(cap::css(QEMU_CAP) & 1, 1);
        assert_eq!(cap::mpsmin(QEMU_CAP), 0);
        assert_eq!(cap::mpsmax(QEMU_CAP), 4);
    }

    #[test]
    fn completion_status_fields() {
        // Phase 1, SCT 2 (media), SC 0x81 (unrecovered read error), DNR.
        let entry = CompletionEntry {
            status: 1 | 0x81 << 1 | 2 << 9 | 1 << 15,
            ..CompletionEntry::default()
        };
        assert!(entry.phase());
        assert_eq!(entry.status_code(), status::UNRECOVERED_READ_ERROR);
        assert_eq!(entry.status_code_type(), status::SCT_MEDIA);
        assert!(entry.do_not_retry());
    }

    #[test]
    fn submission_entry_packs_opcode_and_command_id() {
        let entry = SubmissionEntry::new(io::READ, 0xbeef);
        assert_eq!(entry.cdw0, 0xbeef_0002);
        assert_eq!(entry.opcode(), io::READ);
        assert_eq!(entry.command_id(), 0xbeef);
    }
}

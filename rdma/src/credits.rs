//! Credit-based flow control for SEND/RECV messaging, as pure bookkeeping
//! (no verbs), so its rules can be tested on any machine.
//!
//! Each side posts `credits` receive slots for data messages, plus
//! [`CONTROL_SLOTS`] slots for credit-only messages. A sender spends one
//! credit per data message and never sends without one, so it can never
//! overrun the peer's ring (no receiver-not-ready stall, no unbounded
//! buffering). A receiver earns a credit back for the peer when the
//! consumer takes a message (not when it arrives): the memory a peer can
//! make us hold is bounded by `credits` x message size whether or not our
//! consumer keeps up. Earned credits ride on the next data message; when
//! half the ring is owed and nothing is going the other way, a credit-only
//! message carries them. Credit-only messages spend no credit; at most one
//! is in flight at a time, which the reserved control slots absorb (one is
//! being reposted while the next may already arrive).

/// Receive slots reserved for credit-only messages.
pub const CONTROL_SLOTS: u32 = 2;

/// One connection's credit state.
#[derive(Debug, Clone)]
pub struct Credits {
    /// Data messages we may still send.
    send_available: u32,
    /// Credits earned for the peer and not yet sent back.
    owed_to_peer: u32,
    /// Whether a credit-only message of ours is not yet completed.
    control_in_flight: bool,
    /// The peer's data ring size (what it announced).
    peer_credits: u32,
    /// Our data ring size.
    local_credits: u32,
}

impl Credits {
    pub fn new(local_credits: u32, peer_credits: u32) -> Credits {
        Credits {
            send_available: peer_credits,
            owed_to_peer: 0,
            control_in_flight: false,
            peer_credits,
            local_credits,
        }
    }

    /// Takes a credit for one data message, and the credits to piggyback on
    /// it; `None` when the sender must wait.
    pub fn take_for_send(&mut self) -> Option<u32> {
        if self.send_available == 0 {
            return None;
        }
        self.send_available -= 1;
        Some(std::mem::take(&mut self.owed_to_peer))
    }

    /// The peer returned `returned` credits. Returns false when that would
    /// exceed what the peer was ever given (a protocol violation).
    pub fn on_returned(&mut self, returned: u32) -> bool {
        match self.send_available.checked_add(returned) {
            Some(total) if total <= self.peer_credits => {
                self.send_available = total;
                true
            }
            _ => false,
        }
    }

    /// The consumer took one data message: one credit is owed to the peer.
    /// Returns the credits to send in a credit-only message now, if one is
    /// due (half our ring owed and none in flight).
    pub fn on_consumed(&mut self) -> Option<u32> {
        self.owed_to_peer += 1;
        self.control_due()
    }

    /// Our credit-only message completed; another may be due.
    pub fn on_control_completed(&mut self) -> Option<u32> {
        self.control_in_flight = false;
        self.control_due()
    }

    fn control_due(&mut self) -> Option<u32> {
        let threshold = self.local_credits.div_ceil(2);
        if self.control_in_flight || self.owed_to_peer < threshold {
            return None;
        }
        self.control_in_flight = true;
        Some(std::mem::take(&mut self.owed_to_peer))
    }

    pub fn send_available(&self) -> u32 {
        self.send_available
    }

    pub fn owed_to_peer(&self) -> u32 {
        self.owed_to_peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_never_exceeds_the_peers_ring() {
        let mut credits = Credits::new(4, 3);
        assert_eq!(credits.take_for_send(), Some(0));
        assert_eq!(credits.take_for_send(), Some(0));
        assert_eq!(credits.take_for_send(), Some(0));
        assert_eq!(credits.take_for_send(), None);
        assert!(credits.on_returned(2));
        assert_eq!(credits.send_available(), 2);
        // Returning more than was ever given is a violation.
        assert!(!credits.on_returned(2));
        assert_eq!(credits.send_available(), 2);
    }

    #[test]
    fn consumed_messages_are_owed_and_piggybacked() {
        let mut credits = Credits::new(8, 8);
        assert_eq!(credits.on_consumed(), None);
        assert_eq!(credits.on_consumed(), None);
        assert_eq!(credits.owed_to_peer(), 2);
        assert_eq!(credits.take_for_send(), Some(2));
        assert_eq!(credits.owed_to_peer(), 0);
    }

    #[test]
    fn one_credit_message_in_flight_at_a_time() {
        let mut credits = Credits::new(4, 4);
        assert_eq!(credits.on_consumed(), None);
        assert_eq!(credits.on_consumed(), Some(2));
        assert_eq!(credits.on_consumed(), None);
        assert_eq!(credits.on_consumed(), None);
        assert_eq!(credits.owed_to_peer(), 2);
        assert_eq!(credits.on_control_completed(), Some(2));
        assert_eq!(credits.on_control_completed(), None);
    }

    /// Over any interleaving, what a sender has in the peer's ring plus
    /// what the peer holds unconsumed never exceeds the ring.
    #[test]
    fn ring_occupancy_is_bounded() {
        let ring = 5;
        let mut sender = Credits::new(ring, ring);
        let mut receiver = Credits::new(ring, ring);
        let mut in_ring = 0u32;
        let mut returned_in_flight = 0u32;
        let mut state = 0x9e37_79b9_u32;
        for _ in 0..10_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            match state % 3 {
                0 => {
                    if let Some(piggyback) = sender.take_for_send() {
                        assert_eq!(piggyback, 0, "this sender never receives");
                        in_ring += 1;
                        assert!(in_ring <= ring);
                    }
                }
                1 => {
                    if in_ring > 0 {
                        in_ring -= 1;
                        if let Some(returned) = receiver.on_consumed() {
                            returned_in_flight += returned;
                        }
                    }
                }
                _ => {
                    if returned_in_flight > 0 {
                        assert!(sender.on_returned(returned_in_flight));
                        returned_in_flight = 0;
                        if let Some(returned) = receiver.on_control_completed() {
                            returned_in_flight += returned;
                        }
                    }
                }
            }
            assert!(in_ring + sender.send_available() <= ring);
        }
    }
}

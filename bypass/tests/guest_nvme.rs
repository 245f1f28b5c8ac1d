//! The userspace NVMe driver on a real (emulated) NVMe controller, inside
//! the QEMU guest of shared/vm: the `BlockDevice` contract checks shared
//! with the host devices, the driver's own statistics (doorbell batching,
//! the bounce path, idle parking, I/Os issued and reaped on the executor's
//! thread at depth 1 and 64, tasks run to completion on the reactors),
//! Identify, orderly close and reopen, and its faults: a command timeout
//! ending in Abort and controller disable (while the waiting future polls,
//! and after it was dropped mid-poll), and a controller reset under the
//! driver's feet mid-I/O.
//!
//! Guest only (scripts/test-guest runs every `guest_*` binary in one guest
//! with `--nvme 1G`): the test binds `$FLYFS_NVME_PCI` to vfio-pci itself and
//! FAILS if the variable is missing or binding fails, so it never passes by
//! skipping. Run one by hand with
//! `CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="/work/shared/vm/guest --nvme 1G --" \
//!  cargo test -p flyfs-bypass --test guest_nvme -- --test-threads=1`.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use flyfs_bypass::nvme::testing::guest_controller;
use flyfs_bypass::nvme::{NvmeConfig, NvmeDevice};
use flyfs_bypass::{BlockDevice, BufferPool, DeviceError, DmaBuf, HugePages, PoolConfig};

use common::contract::{self, MIB};

fn pool() -> BufferPool {
    BufferPool::new(&PoolConfig {
        classes: vec![(4096, 256), (65536, 16), (4 << 20, 4)],
        hugepages: HugePages::Never,
    })
    .expect("buffer pool")
}

fn run<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// Lone I/Os take the direct path, with a polling budget no I/O of the
/// emulated controller comes near, so that none hands over to the reactor
/// even on a loaded host.
fn polling() -> NvmeConfig {
    NvmeConfig {
        poll_budget_us: 5_000_000,
        ..NvmeConfig::default()
    }
}

fn open(config: &NvmeConfig, pool: &BufferPool) -> NvmeDevice {
    NvmeDevice::open(guest_controller(), config, Some(pool)).expect("open the NVMe controller")
}

#[test]
fn nvme_device_keeps_the_contract() {
    let pool = pool();
    let device = open(&NvmeConfig::default(), &pool);
    let identity = device.identity().clone();
    assert_eq!(identity.model, "QEMU NVMe Ctrl");
    assert!(identity.serial.starts_with("flyfs-nvme"), "{identity:?}");
    assert_eq!(device.geometry().sector_size, 512);
    assert_eq!(device.geometry().capacity_bytes, 1 << 30);
    run(contract::all(&device, &pool));
    let stats = device.stats();
    assert!(
        stats.bounced > 0,
        "heap buffers went through the bounce region: {stats:?}"
    );
    assert!(
        stats.commands > stats.doorbells,
        "doorbells are batched: {stats:?}"
    );
    assert!(stats.commands >= stats.submitted - 8, "{stats:?}");
    assert_eq!(stats.timeouts, 0, "{stats:?}");
    assert!(device.failure().is_none());
}

/// Threads submitting at once are spread over the queue pairs, each of
/// which carries commands, and every thread reads back what it wrote.
#[test]
fn concurrent_submitters_use_every_queue_pair() {
    let pool = pool();
    let config = NvmeConfig {
        queue_pairs: 4,
        queue_depth: 32,
        ..NvmeConfig::default()
    };
    let device = open(&config, &pool);
    assert_eq!(
        device.queue_pairs(),
        4,
        "QEMU's controller grants 64 I/O queue pairs"
    );
    let threads: Vec<_> = (0..8u64)
        .map(|thread| {
            let device = device.clone();
            let pool = pool.clone();
            std::thread::spawn(move || {
                let local = tokio::task::LocalSet::new();
                run(local.run_until(async {
                    let base = 200 * MIB + thread * 4 * MIB;
                    let mut tasks = tokio::task::JoinSet::new();
                    for slot in 0..8u64 {
                        let device = device.clone();
                        let pool = pool.clone();
                        tasks.spawn_local(async move {
                            let data = contract::pattern(thread * 100 + slot, 65536);
                            let at = base + slot * 65536;
                            contract::write_at(&device, Some(&pool), at, &data).await;
                            assert!(
                                contract::read_at(&device, Some(&pool), at, data.len()).await
                                    == data,
                                "thread {thread} slot {slot} read back other bytes"
                            );
                        });
                    }
                    while let Some(joined) = tasks.join_next().await {
                        joined.expect("submitter");
                    }
                }))
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("submitting thread");
    }
    let per_queue = device.commands_per_queue_pair();
    assert_eq!(per_queue.len(), 4);
    assert!(
        per_queue.iter().all(|&commands| commands > 0),
        "every queue pair carried commands: {per_queue:?}"
    );
    assert!(device.failure().is_none());
}

#[test]
fn data_survives_close_and_reopen() {
    let pool = pool();
    let data = contract::pattern(77, 256 * 1024);
    {
        let device = open(&NvmeConfig::default(), &pool);
        run(contract::write_at(&device, Some(&pool), 100 * MIB, &data));
        run(device.flush()).expect("flush");
        // Drop: orderly shutdown (CC.SHN), IOMMU mappings removed.
    }
    let device = open(&NvmeConfig::default(), &pool);
    assert!(
        run(contract::read_at(
            &device,
            Some(&pool),
            100 * MIB,
            data.len()
        )) == data
    );
    device.shutdown();
    let error = run(device.flush()).expect_err("closed");
    assert!(matches!(error, DeviceError::Closed { .. }), "{error}");
}

/// A lone I/O goes from its submitter to the controller and back to its
/// future without the reactor thread: the submitter writes the command and
/// rings the doorbell, and the future reaps the completion when its
/// executor polls it. The data is right either way.
#[test]
fn lone_ios_are_issued_and_reaped_on_the_executor_thread() {
    let pool = pool();
    let device = open(&polling(), &pool);
    run(async {
        for block in 0..64u64 {
            let data = contract::pattern(block, 4096);
            let at = 300 * MIB + block * 4096;
            contract::write_at(&device, Some(&pool), at, &data).await;
            assert!(
                contract::read_at(&device, Some(&pool), at, 4096).await == data,
                "block {block} read back other bytes"
            );
        }
    });
    let stats = settled(&device);
    // The reactor's idle turns (a health check every 100 ms) hold the
    // queue pair for microseconds and may reap a completion that lands
    // then, so nearly all but not provably all of the 128 I/Os take the
    // direct path both ways.
    assert!(stats.direct >= 64, "{stats:?}");
    assert!(stats.reaped_by_futures >= 64, "{stats:?}");
    assert!(
        stats.reaped_by_reactors < stats.reaped_by_futures,
        "{stats:?}"
    );
    assert_eq!(stats.handovers, 0, "{stats:?}");
    assert_eq!(stats.submitted, stats.completed, "{stats:?}");
    drop(device);
    // A zero budget hands every request to the reactor.
    let handing_over = NvmeConfig {
        poll_budget_us: 0,
        ..NvmeConfig::default()
    };
    let device = open(&handing_over, &pool);
    run(contract::write_at(
        &device,
        Some(&pool),
        300 * MIB,
        &[9u8; 4096],
    ));
    // The reactor answers the request before it finishes its bookkeeping.
    let stats = settled(&device);
    assert_eq!((stats.direct, stats.reaped_by_futures), (0, 0), "{stats:?}");
    assert_eq!(stats.reaped_by_reactors, 1, "{stats:?}");
}

/// A request that finds its queue pair idle right after a burst (several
/// requests in flight at once) goes to the reactor, not the direct path: it
/// is most likely the first of the next burst (`Lane::deep`). The one after
/// it, alone in its busy period, goes direct again. Counted over trials,
/// because a request may also miss the direct path when the reactor's turn
/// holds the lane as it comes.
#[test]
fn a_request_after_a_burst_goes_to_the_reactor() {
    let pool = pool();
    let device = open(&polling(), &pool);
    run(contract::write_at(
        &device,
        Some(&pool),
        500 * MIB,
        &[5u8; 16384],
    ));
    let read = |block: u64| {
        let device = device.clone();
        let pool = pool.clone();
        async move {
            let completion = device
                .read(500 * MIB + block * 4096, pool.alloc(4096))
                .await;
            completion.result.expect("read");
            assert!(
                completion.buf[..] == [5u8; 4096][..],
                "block {block} read other bytes"
            );
        }
    };
    let trials = 20;
    let (mut after_burst, mut after_lone) = (0, 0);
    for _ in 0..trials {
        run(async {
            tokio::join!(read(0), read(1), read(2), read(3));
        });
        let before = settled(&device).direct;
        run(read(0));
        let between = settled(&device).direct;
        run(read(1));
        let after = settled(&device).direct;
        after_burst += between - before;
        after_lone += after - between;
    }
    let stats = device.stats();
    assert!(
        stats.in_flight_max >= 2,
        "the bursts never overlapped: {stats:?}"
    );
    assert!(
        after_burst <= trials / 4,
        "{after_burst} of {trials} requests after a burst went direct: {stats:?}"
    );
    assert!(
        after_lone >= trials / 2,
        "only {after_lone} of {trials} lone requests went direct: {stats:?}"
    );
}

/// The device's counters once every request it took is counted as
/// completed (whoever answered a request may count it just after).
fn settled(device: &NvmeDevice) -> flyfs_bypass::nvme::NvmeStats {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = device.stats();
        if stats.completed == stats.submitted {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "requests never completed: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Writes `blocks` 4 KiB blocks from `base`, block `i` holding pattern `i`.
fn write_patterns(device: &NvmeDevice, pool: &BufferPool, base: u64, blocks: u64) {
    run(async {
        for block in 0..blocks {
            let data = contract::pattern(block, 4096);
            contract::write_at(device, Some(pool), base + block * 4096, &data).await;
        }
    });
}

/// Many I/Os from one executor thread still build a deep queue: a future
/// that reaps yields between polls, so the executor's other tasks add their
/// I/Os before any one finishes (an I/O completed on its submitting thread
/// before its task yields would keep the queue at depth 1), and only a lone
/// I/O takes the direct path.
#[test]
fn one_executor_thread_keeps_a_deep_queue() {
    let pool = pool();
    let device = open(&polling(), &pool);
    let tasks = 64u64;
    let rounds = 8u64;
    write_patterns(&device, &pool, 400 * MIB, tasks);
    let before = device.stats();
    let local = tokio::task::LocalSet::new();
    run(local.run_until(async {
        let mut readers = tokio::task::JoinSet::new();
        for task in 0..tasks {
            let device = device.clone();
            let pool = pool.clone();
            readers.spawn_local(async move {
                let expected = contract::pattern(task, 4096);
                for _ in 0..rounds {
                    let completion = device.read(400 * MIB + task * 4096, pool.alloc(4096)).await;
                    completion.result.expect("read");
                    assert!(
                        completion.buf[..] == expected[..],
                        "task {task} read other bytes"
                    );
                }
            });
        }
        while let Some(joined) = readers.join_next().await {
            joined.expect("reader");
        }
    }));
    let stats = device.stats();
    assert_eq!(stats.submitted, stats.completed, "{stats:?}");
    assert!(
        stats.in_flight_max >= 16,
        "one thread's 64 readers never had 16 commands in flight: {stats:?}"
    );
    // Once the queue builds, requests go to the reactor thread, which
    // issues and reaps beside the executor's thread.
    assert!(stats.direct - before.direct < tasks * rounds, "{stats:?}");
}

/// Tasks spawned on the device run on its reactor threads, SPDK's
/// run-to-completion model: a task stays on the thread it started on across
/// its awaits, the reactor issues and reaps every I/O it makes (none takes
/// the direct path, none is reaped by its future or handed over), its
/// tasks still keep a deep queue, and the tasks are dealt out over every
/// queue pair.
#[test]
fn spawned_tasks_run_to_completion_on_the_reactors() {
    let pool = pool();
    let device = open(&polling(), &pool);
    let tasks = 64u64;
    let rounds = 8u64;
    write_patterns(&device, &pool, 420 * MIB, tasks);
    let before = settled(&device);
    let spawned: Vec<_> = (0..tasks)
        .map(|task| {
            let reader = device.clone();
            let pool = pool.clone();
            device.spawn(async move {
                let thread = std::thread::current();
                let name = thread.name().unwrap_or_default().to_string();
                assert!(
                    name.starts_with("flyfs-nvme-"),
                    "task {task} runs on thread {name:?}, not a reactor"
                );
                let expected = contract::pattern(task, 4096);
                for _ in 0..rounds {
                    let completion = reader.read(420 * MIB + task * 4096, pool.alloc(4096)).await;
                    completion.result.expect("read");
                    assert!(
                        completion.buf[..] == expected[..],
                        "task {task} read other bytes"
                    );
                    assert_eq!(
                        std::thread::current().id(),
                        thread.id(),
                        "task {task} moved off its reactor"
                    );
                }
                name
            })
        })
        .collect();
    let threads: std::collections::BTreeSet<String> = spawned.into_iter().map(run).collect();
    assert_eq!(
        threads.len(),
        device.queue_pairs(),
        "tasks ran on {threads:?}"
    );
    let stats = settled(&device);
    assert_eq!(
        stats.submitted - before.submitted,
        tasks * rounds,
        "{stats:?}"
    );
    assert_eq!(stats.direct, before.direct, "{stats:?}");
    assert_eq!(
        stats.reaped_by_futures, before.reaped_by_futures,
        "{stats:?}"
    );
    assert_eq!(stats.handovers, before.handovers, "{stats:?}");
    assert!(
        stats.in_flight_max >= 16,
        "64 tasks never had 16 commands in flight: {stats:?}"
    );
}

/// A task that panics fails whoever awaits it, not the reactor: every
/// queue pair still serves tasks and I/O afterwards. A task woken after
/// shutdown is cancelled, and so is one spawned after it, rather than left
/// queued forever.
#[test]
fn a_panicking_task_spares_the_reactor_and_shutdown_cancels_tasks() {
    let pool = pool();
    let device = open(&NvmeConfig::default(), &pool);
    for _ in 0..device.queue_pairs() {
        let task = device.spawn(async { panic!("a task's panic (test)") });
        let awaited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(task)));
        assert!(awaited.is_err(), "the task's panic was not raised");
    }
    for round in 0..2 * device.queue_pairs() as u64 {
        let writer = device.clone();
        let pool = pool.clone();
        let data = contract::pattern(round, 4096);
        let back = run(device.spawn(async move {
            contract::write_at(&writer, Some(&pool), 430 * MIB, &data).await;
            contract::read_at(&writer, Some(&pool), 430 * MIB, data.len()).await == data
        }));
        assert!(back, "round {round} read other bytes");
    }
    let (wake, woken) = tokio::sync::oneshot::channel::<()>();
    let (started, running) = std::sync::mpsc::channel();
    let waiting = device.spawn(async move {
        started.send(()).expect("the test waits");
        let _ = woken.await;
    });
    // Started, so that shutdown finds it waiting, not ready to run.
    running
        .recv_timeout(Duration::from_secs(60))
        .expect("the task started");
    device.shutdown();
    // Woken after its reactor exited: cancelled where it is scheduled.
    wake.send(()).expect("the task still waits");
    assert!(
        run(waiting.fallible()).is_none(),
        "a task woken after shutdown ran"
    );
    assert!(
        run(device.spawn(async { 1 }).fallible()).is_none(),
        "a task spawned after shutdown ran"
    );
}

/// The last clone of a device dropped by a task, on a reactor thread,
/// with a read of its own still in flight, shuts the device down without
/// waiting on the other reactors: they cannot exit while the read is
/// outstanding, and only this reactor can finish it (joining them
/// deadlocked). The reactors exit on their own and the controller, shut
/// down by the last of them, opens again with the task's data on it.
#[test]
fn the_last_clone_dropped_on_a_reactor_shuts_the_device_down() {
    let pool = pool();
    let device = open(&NvmeConfig::default(), &pool);
    let data = contract::pattern(99, 64 * 1024);
    let (go, ready) = tokio::sync::oneshot::channel::<()>();
    let task = {
        let owner = device.clone();
        let pool = pool.clone();
        let data = data.clone();
        device.spawn(async move {
            ready.await.expect("the test signals");
            contract::write_at(&owner, Some(&pool), 440 * MIB, &data).await;
            owner.flush().await.expect("flush");
            // Submitted on this reactor's queue pair, then left to it.
            let mut read = Box::pin(owner.read(440 * MIB, pool.alloc(4096)));
            let mut context = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(
                read.as_mut().poll(&mut context).is_pending(),
                "a task's read completed as it was submitted"
            );
            drop(read);
            drop(owner);
        })
    };
    // Only the task holds the device now; it drops it once it has written.
    drop(device);
    go.send(()).expect("the task waits");
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        run(task);
        done.send(())
    });
    finished
        .recv_timeout(Duration::from_secs(120))
        .expect("the task dropping the last clone never finished: the reactors deadlocked");
    let deadline = Instant::now() + Duration::from_secs(60);
    let device = loop {
        match NvmeDevice::open(guest_controller(), &NvmeConfig::default(), Some(&pool)) {
            Ok(device) => break device,
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "the controller never came free: {error}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    assert!(
        run(contract::read_at(
            &device,
            Some(&pool),
            440 * MIB,
            data.len()
        )) == data,
        "the task's write was lost"
    );
}

#[test]
fn an_idle_reactor_parks() {
    let pool = pool();
    // Every I/O through the reactor, so that the one after it parked has
    // to wake it.
    let config = NvmeConfig {
        poll_budget_us: 0,
        ..NvmeConfig::default()
    };
    let device = open(&config, &pool);
    run(contract::write_at(&device, Some(&pool), 0, &[1u8; 4096]));
    let before = device.stats().sleeps;
    let deadline = Instant::now() + Duration::from_secs(60);
    while device.stats().sleeps == before {
        assert!(Instant::now() < deadline, "the reactor never parked");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A parked reactor wakes for the next I/O.
    run(contract::write_at(&device, Some(&pool), 0, &[2u8; 4096]));
    assert!(device.stats().wakeups > 0 || device.stats().sleeps > before);
}

/// The reactor owns timeouts even while the waiting future reaps for
/// itself: its budget (a minute) outlasts the command's two timeouts, so the
/// future is still polling when the reactor aborts the command and fails
/// the device.
#[test]
fn a_command_that_never_completes_times_out_and_fails_the_device() {
    let pool = pool();
    let config = NvmeConfig {
        command_timeout_ms: 500,
        poll_budget_us: 60_000_000,
        ..NvmeConfig::default()
    };
    let device = open(&config, &pool);
    run(contract::write_at(&device, Some(&pool), 0, &[3u8; 4096]));
    device.inject_doorbell_stall();
    // The write before may have gone to the reactor (its thread held the
    // lane when the write came): count only the read.
    let direct_before = device.stats().direct;
    let start = Instant::now();
    let completion = run(device.read(0, pool.alloc(4096)));
    let error = completion
        .result
        .expect_err("a stalled command cannot succeed");
    assert!(
        matches!(
            error,
            DeviceError::Failed { .. } | DeviceError::TimedOut { .. }
        ),
        "{error}"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "failed before its timeout"
    );
    let reason = device.failure().expect("the device failed for good");
    assert!(reason.contains("did not complete"), "{reason}");
    let stats = device.stats();
    assert!(stats.timeouts >= 1 && stats.aborts >= 1, "{stats:?}");
    // The read was issued by this thread and its future polled throughout:
    // it never handed over, yet the reactor timed it out.
    assert_eq!(stats.direct, direct_before + 1, "{stats:?}");
    assert_eq!(stats.handovers, 0, "{stats:?}");
    // The buffer came back: the controller was disabled, so it cannot DMA.
    assert_eq!(completion.buf.len(), 4096);
    let error = run(device.write(0, DmaBuf::alloc_zeroed(4096)))
        .result
        .expect_err("failed device");
    assert!(matches!(error, DeviceError::Failed { .. }), "{error}");
    drop(device);
    // The controller comes back for the next user.
    let device = open(&NvmeConfig::default(), &pool);
    assert!(run(contract::read_at(&device, Some(&pool), 0, 4096)) == vec![3u8; 4096]);
}

/// A future dropped after its first poll (cancelled while it reaps for
/// itself) leaves its command to the reactor: the completion is consumed,
/// the request answered and its buffer freed only then; and a command that
/// never completes is still timed out by the reactor, which fails the
/// device and only then lets the buffer go.
#[test]
fn a_future_dropped_mid_poll_leaves_its_command_to_the_reactor() {
    let pool = pool();
    let config = NvmeConfig {
        command_timeout_ms: 500,
        poll_budget_us: 60_000_000,
        ..NvmeConfig::default()
    };
    let device = open(&config, &pool);
    let data = contract::pattern(7, 4096);
    run(contract::write_at(&device, Some(&pool), 8192, &data));
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    let deadline = Instant::now() + Duration::from_secs(60);

    let before = device.stats();
    let mut read = Box::pin(device.read(8192, pool.alloc(4096)));
    let finished_at_once = read.as_mut().poll(&mut context).is_ready();
    drop(read);
    let stats = device.stats();
    assert_eq!(stats.direct, before.direct + 1, "{stats:?}");
    while device.stats().completed < stats.submitted {
        assert!(
            Instant::now() < deadline,
            "the dropped read's command was never answered: {:?}",
            device.stats()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    if !finished_at_once {
        // Nobody polled after the drop: the reactor, woken by it, reaped.
        while device.stats().reaped_by_reactors == before.reaped_by_reactors {
            assert!(Instant::now() < deadline, "{:?}", device.stats());
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(run(contract::read_at(&device, Some(&pool), 8192, 4096)) == data);

    device.inject_doorbell_stall();
    let mut read = Box::pin(device.read(8192, pool.alloc(4096)));
    assert!(read.as_mut().poll(&mut context).is_pending(), "stalled");
    drop(read);
    while device.failure().is_none() {
        assert!(
            Instant::now() < deadline,
            "the dropped read's stalled command was never timed out: {:?}",
            device.stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let reason = device.failure().expect("failed");
    assert!(reason.contains("did not complete"), "{reason}");
    let stats = device.stats();
    assert!(stats.timeouts >= 1 && stats.aborts >= 1, "{stats:?}");
    while device.stats().completed < device.stats().submitted {
        assert!(Instant::now() < deadline, "{:?}", device.stats());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A reset of the controller by someone else while commands are queued:
/// the reactor notices (CSTS.RDY dropped) long before the commands' 30 s
/// timeout, fails them and the device, and hands the buffers back (the
/// controller is disabled, so it cannot DMA into them).
///
/// The commands sit in the submission queue with the doorbell held back:
/// QEMU 7.2's emulated controller crashes (the QEMU process segfaults) when
/// CC.EN is cleared while its block backend has requests in flight, which a
/// first version of this test, resetting under 32 busy writers, showed.
#[test]
fn a_controller_reset_with_commands_queued_fails_them_and_the_device() {
    let pool = pool();
    let device = open(&NvmeConfig::default(), &pool);
    run(contract::write_at(&device, Some(&pool), 0, &[4u8; 4096]));
    device.inject_doorbell_stall();
    let start = Instant::now();
    let outcomes = run(async {
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..16u64 {
            let device = device.clone();
            let pool = pool.clone();
            tasks.spawn(async move {
                let completion = device.write(index * 65536, pool.alloc(65536)).await;
                assert_eq!(completion.buf.len(), 65536, "the buffer comes back");
                completion.result
            });
        }
        let queued = device.stats().commands;
        while device.stats().commands == queued {
            tokio::task::yield_now().await;
        }
        device.inject_controller_reset();
        let mut outcomes = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            outcomes.push(joined.expect("writer"));
        }
        outcomes
    });
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "noticed by the health check, not a timeout"
    );
    for outcome in &outcomes {
        let error = outcome
            .as_ref()
            .expect_err("a write lost to the reset cannot succeed");
        assert!(matches!(error, DeviceError::Failed { .. }), "{error}");
    }
    let reason = device.failure().expect("the device failed for good");
    assert!(
        reason.contains("reset behind the driver's back"),
        "{reason}"
    );
    drop(device);
    let device = open(&NvmeConfig::default(), &pool);
    assert!(run(contract::read_at(&device, Some(&pool), 0, 4096)) == vec![4u8; 4096]);
}

#[test]
fn open_errors_name_the_problem() {
    let error =
        NvmeDevice::open("0000:00:1f.7", &NvmeConfig::default(), None).expect_err("nothing there");
    assert!(
        error.to_string().contains("no PCI device at 0000:00:1f.7"),
        "{error}"
    );
    // The host bridge is a PCI device but no NVMe controller.
    let error =
        NvmeDevice::open("0000:00:00.0", &NvmeConfig::default(), None).expect_err("a bridge");
    assert!(
        error.to_string().contains("is not an NVMe controller"),
        "{error}"
    );
    // The controller is held open by another device in this process: its
    // group cannot be opened twice.
    let pool = pool();
    let _held = open(&NvmeConfig::default(), &pool);
    let error =
        NvmeDevice::open(guest_controller(), &NvmeConfig::default(), None).expect_err("busy");
    assert!(
        error.to_string().contains("cannot open the VFIO group"),
        "{error}"
    );
}

/// Unbinding the controller from vfio-pci while the driver holds it: the
/// kernel asks for the device back (VFIO's request interrupt), the driver
/// fails the device, answers every I/O, and lets go, so the unbind
/// completes instead of waiting forever.
#[test]
fn unbinding_the_device_fails_it_and_lets_go() {
    let pool = pool();
    let device = open(&NvmeConfig::default(), &pool);
    run(contract::write_at(&device, Some(&pool), 0, &[5u8; 4096]));
    let address = guest_controller().to_owned();
    let unbind = std::thread::spawn(move || {
        std::fs::write("/sys/bus/pci/drivers/vfio-pci/unbind", &address)
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while device.failure().is_none() {
        assert!(
            Instant::now() < deadline,
            "the driver never noticed the unbind"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let reason = device.failure().expect("failed");
    assert!(reason.contains("unbound from vfio-pci"), "{reason}");
    let completion = run(device.read(0, pool.alloc(4096)));
    let error = completion
        .result
        .expect_err("an unbound device serves no I/O");
    assert!(matches!(error, DeviceError::Failed { .. }), "{error}");
    while !unbind.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the unbind never completed: the driver did not let go"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    unbind.join().expect("unbind thread").expect("unbind");
    drop(device);
    // Bind it again for the tests after this one.
    let output = std::process::Command::new("vfio-bind")
        .arg(guest_controller())
        .output()
        .expect("vfio-bind");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let device = open(&NvmeConfig::default(), &pool);
    assert!(run(contract::read_at(&device, Some(&pool), 0, 4096)) == vec![5u8; 4096]);
}

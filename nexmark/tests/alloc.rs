//! Checks the allocation claims of the Nexmark module with a counting allocator (its
//! own test binary, so no other test sees the allocator): generating events into a
//! reserved Vec allocates nothing, and reading JSON Lines allocates at most one buffer
//! per string field of the events read.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use dirigo_nexmark::{write_json_line, Event, EventReader, Generator, GeneratorConfig};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Allocations reading one event may make: its owned strings, plus the box of a
/// person or an auction.
fn string_fields(e: &Event) -> u64 {
    match e {
        Event::Person(_) => 6 + 1,
        Event::Auction(_) => 3 + 1,
        Event::Bid(_) => 3,
    }
}

#[test]
fn nexmark_fill_and_read_allocate_only_event_strings() {
    let g = Generator::new(GeneratorConfig::default()).expect("valid config");
    let mut events = Vec::with_capacity(100_000);
    g.fill(0..10, &mut events); // builds the static pools
    events.clear();
    let before = allocations();
    g.fill(0..100_000, &mut events);
    // Persons and auctions are boxed (4 of every 50 events); bids and strings are not.
    let boxed = events
        .iter()
        .filter(|e| !matches!(e, Event::Bid(_)))
        .count() as u64;
    assert_eq!(boxed, 100_000 / 50 * 4);
    assert_eq!(
        allocations() - before,
        boxed,
        "generating events allocated more than one box per person and auction"
    );

    let mut text = Vec::new();
    for e in &events {
        write_json_line(e, &mut text);
    }
    let budget: u64 = events.iter().map(string_fields).sum();
    let mut reader = EventReader::new(&text[..]);
    let first = reader.next();
    assert!(matches!(first, Some(Ok(_))));
    let before = allocations();
    let mut read = 1;
    for event in reader.by_ref() {
        assert!(event.is_ok());
        read += 1;
    }
    let used = allocations() - before;
    assert_eq!(read, events.len());
    assert!(
        used <= budget,
        "reading allocated {used} times for {budget} string fields"
    );
    println!("nexmark_alloc: reading allocated {used} times for {budget} string fields");
}

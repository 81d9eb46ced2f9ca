//! Readers' own slots (`src/read_cache.rs`): a slot answers only while the
//! map has not changed, and a value `forget` removed is not kept in one.
#![cfg(loom)]

use epochflight::{Epoch, SingleFlight};
use epochflight_loom_tests::{Counter, K, check};
use loom::sync::Arc;
use loom::thread;

/// A value that counts its live copies.
#[derive(Debug)]
struct Token(Counter);

impl Token {
    fn new(live: &Counter) -> Self {
        live.bump();
        Token(live.clone())
    }
}

impl Clone for Token {
    fn clone(&self) -> Self {
        Token::new(&self.0)
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        self.0.drop_one();
    }
}

/// A reader fills its slot (second read in a row) while `forget` removes the
/// value: whatever the order, no copy of the forgotten value is left once
/// both are done (a slot's copy would be one).
#[test]
fn a_forget_racing_a_slot_fill_leaves_no_copy() {
    check("reads: forget vs slot fill", None, || {
        let live = Counter::new();
        let sf: Arc<SingleFlight<u8, Token>> = Arc::new(SingleFlight::new());
        sf.set(K, Token::new(&live));
        let reader = {
            let sf = sf.clone();
            thread::spawn(move || {
                drop(sf.current(&K));
                drop(sf.current(&K));
            })
        };
        sf.forget(&K);
        reader.join().unwrap();
        assert_eq!(live.get(), 0, "a copy of the forgotten value is kept");
    });
}

/// A reader's answers never go back: a `set` racing two reads (the second
/// possibly from the slot the first filled) is seen in order.
#[test]
fn a_reader_never_sees_an_older_value_after_a_newer_one() {
    check("reads: set vs slot reads", None, || {
        let sf: Arc<SingleFlight<u8, u32>> = Arc::new(SingleFlight::new());
        sf.set(K, 1);
        let reader = {
            let sf = sf.clone();
            thread::spawn(move || {
                let epochs: Vec<Epoch> = (0..3).map(|_| sf.epoch(&K)).collect();
                assert!(epochs.windows(2).all(|w| w[0] <= w[1]), "{epochs:?}");
                epochs[2]
            })
        };
        let set = sf.set(K, 2);
        let last = reader.join().unwrap();
        assert!(last <= set);
        assert_eq!(sf.epoch(&K), set, "a read after the set sees it");
    });
}

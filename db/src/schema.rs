//! One diesel schema for both backends (the migrations use types that map identically).

diesel::table! {
    sessions (id) {
        id -> BigInt,
        creation -> BigInt,
        live -> Bool,
        last_update -> BigInt,
        uri -> Text,
    }
}

diesel::table! {
    transactions (id) {
        id -> BigInt,
        rest_id -> Text,
        json -> Text,
        input_done -> Bool,
        final_attempt_reason -> Nullable<Text>,
        creation_session_id -> Nullable<BigInt>,
        lease_session_id -> Nullable<BigInt>,
        lease_generation -> BigInt,
        creation -> BigInt,
        last_update -> BigInt,
        version -> BigInt,
        next_attempt_time -> BigInt,
        message_builder -> Nullable<Text>,
        notification -> Bool,
        no_final_notification -> Bool,
    }
}

diesel::table! {
    blobs (id) {
        id -> BigInt,
        length -> BigInt,
        total -> Nullable<BigInt>,
        creation -> BigInt,
        last_update -> BigInt,
    }
}

diesel::table! {
    blob_chunks (blob_id, chunk_offset) {
        blob_id -> BigInt,
        chunk_offset -> BigInt,
        data -> Binary,
    }
}

diesel::table! {
    tx_blobs (transaction_id, name) {
        transaction_id -> BigInt,
        name -> Text,
        blob_id -> BigInt,
    }
}

diesel::table! {
    attempts (transaction_id, attempt_id) {
        transaction_id -> BigInt,
        attempt_id -> BigInt,
        responses -> Nullable<Text>,
        creation -> BigInt,
        last_update -> BigInt,
    }
}

diesel::joinable!(tx_blobs -> blobs (blob_id));
diesel::joinable!(tx_blobs -> transactions (transaction_id));
diesel::joinable!(attempts -> transactions (transaction_id));
diesel::joinable!(blob_chunks -> blobs (blob_id));

diesel::allow_tables_to_appear_in_same_query!(
    sessions,
    transactions,
    blobs,
    blob_chunks,
    tx_blobs,
    attempts,
);

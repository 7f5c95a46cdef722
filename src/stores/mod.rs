//! State kept outside a request: the model registry and freeze lists (a
//! file, or Redis for several instances: [`registry`]), rate-limit state
//! in Redis ([`redis_limits`]; in-process state is in `filters`), and the
//! JWT verification keys with their JWKS refresh ([`keys`]).

pub mod keys;
pub mod redis_limits;
pub mod registry;

"""Who is asking and what they may do: identities, sign-in, tokens, links, RBAC, limits, audit."""

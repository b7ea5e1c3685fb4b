"""Where vnet can look: named probe points and the hooks that implement them."""

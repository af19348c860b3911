/* Is a buffer all zeros?  Shared by the native modules (scan, VMDK writer).
 *
 * Kept in C because the fast form is a branch-free OR over 64-byte strides that
 * compilers vectorise; the early exit every 4 KiB keeps random data cheap.
 */
#ifndef SMSBLOCK_ZERO_H
#define SMSBLOCK_ZERO_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline int smsblock_is_zero(const void *data, size_t len)
{
    const unsigned char *p = (const unsigned char *)data;
    /* head: bytes until 8-byte alignment */
    while (len && ((uintptr_t)p & 7)) {
        if (*p) return 0;
        p++; len--;
    }
    while (len >= 4096) {
        uint64_t acc = 0;
        for (size_t i = 0; i < 4096; i += 64) {
            uint64_t w[8];
            memcpy(w, p + i, 64);
            acc |= w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7];
        }
        if (acc) return 0;
        p += 4096; len -= 4096;
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        if (w) return 0;
        p += 8; len -= 8;
    }
    while (len) {
        if (*p) return 0;
        p++; len--;
    }
    return 1;
}

#endif

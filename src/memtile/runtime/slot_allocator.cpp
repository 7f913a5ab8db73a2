// The process's CPU allocator, wrapped so that one allocation can be served from a given buffer.
//
// A thread "arms" a slot (pointer, bytes) before calling an op that has no kernel writing into a
// given tensor; the op's first allocation of exactly that many bytes on that thread gets the
// slot, with a deleter that does nothing (the arena owns it). Every other allocation, and every
// allocation while nothing is armed, goes to the allocator that was installed before (with its
// profiler reporting). See slots.py.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstddef>

namespace {

thread_local void* armed_ptr = nullptr;
thread_local std::size_t armed_bytes = 0;

void keep(void* /*unused*/) {}

struct SlotAllocator final : c10::Allocator {
  explicit SlotAllocator(c10::Allocator* base) : base(base) {}

  c10::DataPtr allocate(std::size_t n) override {
    if (armed_ptr != nullptr && n == armed_bytes) {
      void* slot = armed_ptr;
      armed_ptr = nullptr;
      return {slot, slot, &keep, c10::Device(c10::DeviceType::CPU)};
    }
    return base->allocate(n);
  }

  c10::DeleterFnPtr raw_deleter() const override { return base->raw_deleter(); }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  c10::Allocator* base;
};

SlotAllocator* installed = nullptr;

}  // namespace

extern "C" {

// Wrap the current CPU allocator (once per process); 1 when ours is the one in use.
int memtile_slot_install() {
  if (installed == nullptr) {
    installed = new SlotAllocator(c10::GetCPUAllocator());
    c10::SetCPUAllocator(installed, /*priority=*/255);
  }
  return c10::GetCPUAllocator() == installed ? 1 : 0;
}

void memtile_slot_arm(void* ptr, std::size_t bytes) {
  armed_ptr = ptr;
  armed_bytes = bytes;
}

void memtile_slot_disarm() {
  armed_ptr = nullptr;
  armed_bytes = 0;
}

}  // extern "C"

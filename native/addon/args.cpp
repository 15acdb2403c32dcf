// Argument reading: Args (checked arguments and the named fields of a params object, inputs
// copied unless shared, outputs pinned) and the argument error every op throws (ThrowArgument).
#include "addon.h"

#include <cstdint>
#include <cstring>
#include <new>

namespace smla_addon {

void ThrowArgument(Napi::Env env, const std::string& op, const std::string& message) {
  Napi::Error e = Napi::TypeError::New(env, "sparse_mla_native." + op + ": " + message);
  e.Set("code", Napi::String::New(env, "SMLA_ADDON_ARGUMENT"));
  throw e;
}

int32_t Args::IntOf(Napi::Value value, const char* name, int64_t lo, int64_t hi) const {
  if (!value.IsNumber()) ThrowArgument(Env(), op_, std::string(name) + ": expected a number");
  double v = value.As<Napi::Number>().DoubleValue();
  if (!(v >= double(lo) && v <= double(hi)) || v != double(int64_t(v)))
    ThrowArgument(Env(), op_, std::string(name) + ": expected an integer in [" + std::to_string(lo) + ", " +
                                  std::to_string(hi) + "], got " + std::to_string(v));
  return int32_t(v);
}

float Args::FloatOf(Napi::Value value, const char* name) const {
  if (!value.IsNumber()) ThrowArgument(Env(), op_, std::string(name) + ": expected a number");
  return value.As<Napi::Number>().FloatValue();
}

Args::Fields Args::ObjectOf(Napi::Value v, const char* name) {
  if (!v.IsObject() || v.IsTypedArray() || v.IsArray()) ThrowArgument(Env(), op_, std::string(name) + ": expected a params object");
  return Fields(*this, v.As<Napi::Object>());
}

static const char* TypeName(napi_typedarray_type t) {
  switch (t) {
    case napi_uint8_array: return "Uint8Array";
    case napi_uint16_array: return "Uint16Array";
    case napi_int32_array: return "Int32Array";
    case napi_float32_array: return "Float32Array";
    default: return "another typed array";
  }
}

uint8_t* Args::Own(uint64_t bytes) {
  uint8_t* p = bytes <= SIZE_MAX ? new (std::nothrow) uint8_t[size_t(bytes ? bytes : 1)] : nullptr;
  if (!p) {
    Napi::Error e = Napi::Error::New(Env(), "sparse_mla_native." + std::string(op_) + ": cannot allocate " + std::to_string(bytes) + " bytes");
    e.Set("code", Napi::String::New(Env(), "SMLA_OUT_OF_MEMORY"));
    throw e;
  }
  holds_.copies.emplace_back(p);
  return p;
}

const void* Args::InPlaceOrCopy(Napi::TypedArray a, void* data, uint64_t bytes, bool copy_unshared, bool* shared, bool copy_shared) {
  holds_.pins.push_back(Napi::Persistent(static_cast<Napi::Object>(a)));
  napi_value buffer = nullptr;
  bool plain = true;  // an ArrayBuffer (detachable, maybe resizable), not a SharedArrayBuffer
  if (napi_get_typedarray_info(Env(), a, nullptr, nullptr, nullptr, &buffer, nullptr) != napi_ok ||
      napi_is_arraybuffer(Env(), buffer, &plain) != napi_ok)
    ThrowArgument(Env(), op_, "cannot read a typed array's buffer");
  if (shared) *shared = !plain;
  if (bytes == 0) return nullptr;
  if (plain ? !copy_unshared : !copy_shared) return data;
  uint8_t* copy = Own(bytes);
  std::memcpy(copy, data, size_t(bytes));
  return copy;
}

void* Args::ArrayData(Napi::Value value, const char* name, napi_typedarray_type type, uint64_t length, bool nullable, Use use, bool* shared) {
  if (Absent(value)) {
    if (nullable) return nullptr;
    ThrowArgument(Env(), op_, std::string(name) + ": expected a " + TypeName(type) + ", got null");
  }
  if (!value.IsTypedArray()) ThrowArgument(Env(), op_, std::string(name) + ": expected a " + TypeName(type));
  Napi::TypedArray a = value.As<Napi::TypedArray>();
  if (a.TypedArrayType() != type)
    ThrowArgument(Env(), op_, std::string(name) + ": expected a " + TypeName(type) + ", got a " + TypeName(a.TypedArrayType()));
  if (uint64_t(a.ElementLength()) != length)
    ThrowArgument(Env(), op_, std::string(name) + ": expected " + std::to_string(length) + " elements, got " +
                                  std::to_string(a.ElementLength()));
  // The raw call: it gives the view's data pointer (offset applied) for ArrayBuffer and
  // SharedArrayBuffer backing alike (Napi::ArrayBuffer refuses a SharedArrayBuffer).
  void* data = nullptr;
  if (napi_get_typedarray_info(Env(), a, nullptr, nullptr, &data, nullptr, nullptr) != napi_ok)
    ThrowArgument(Env(), op_, std::string(name) + ": cannot read the typed array's memory");
  if (use == Use::kOutput) {
    holds_.pins.push_back(Napi::Persistent(static_cast<Napi::Object>(a)));
    return length == 0 ? nullptr : data;
  }
  return const_cast<void*>(InPlaceOrCopy(a, data, uint64_t(a.ByteLength()), use != Use::kBorrow, shared, use == Use::kSnapshot));
}

const void* Args::InputBytes(size_t i, const char* name, uint64_t* bytes) {
  if (i >= info_.Length() || !info_[i].IsTypedArray()) ThrowArgument(Env(), op_, std::string(name) + ": expected a typed array");
  Napi::TypedArray a = info_[i].As<Napi::TypedArray>();
  void* data = nullptr;
  if (napi_get_typedarray_info(Env(), a, nullptr, nullptr, &data, nullptr, nullptr) != napi_ok)
    ThrowArgument(Env(), op_, std::string(name) + ": cannot read the typed array's memory");
  *bytes = uint64_t(a.ByteLength());
  return InPlaceOrCopy(a, data, *bytes, true, nullptr);
}

}  // namespace smla_addon

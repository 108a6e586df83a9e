defmodule Ottla.TestSupport do
  @moduledoc false
  # Helpers for tests against the real broker.

  import ExUnit.Assertions

  @doc "The real broker's bootstrap string (`OTTLA_KAFKA_ENDPOINTS`, default 127.0.0.1:9092)."
  def endpoints, do: System.get_env("OTTLA_KAFKA_ENDPOINTS", "127.0.0.1:9092")

  @doc "A topic name no other test uses."
  def unique_topic(prefix \\ "ottla-test"),
    do: "#{prefix}-#{System.unique_integer([:positive])}-#{:rand.uniform(1_000_000)}"

  @doc "Creates a fresh topic on the real broker and returns its name."
  def create_topic!(opts \\ []) do
    topic = unique_topic()
    assert :ok == Ottla.create_topic(endpoints(), topic, opts)
    topic
  end

  @doc "Reads a whole partition of the real broker."
  def fetch_all!(topic, partition) do
    assert {:ok, hw, messages} = Ottla.fetch(endpoints(), topic, partition: partition)
    {hw, messages}
  end

  @doc """
  The partition the Java client's default partitioner picks for a key:
  `toPositive(murmur2(key)) % count`, written from the Java client's algorithm so tests can
  check that Ottla places keys exactly where a Java producer would.
  """
  def java_partition(key, count) do
    Bitwise.band(murmur2(key), 0x7FFFFFFF) |> rem(count)
  end

  import Bitwise

  @m 0x5BD1E995
  defp mul(a, b), do: band(a * b, 0xFFFFFFFF)

  defp murmur2(data) do
    len = byte_size(data)
    h = bxor(0x9747B28C, len)
    {h, rest} = blocks(data, h)

    h =
      case rest do
        <<a, b, c>> -> mul(bxor(h, a ||| b <<< 8 ||| c <<< 16), @m)
        <<a, b>> -> mul(bxor(h, a ||| b <<< 8), @m)
        <<a>> -> mul(bxor(h, a), @m)
        <<>> -> h
      end

    h = mul(bxor(h, h >>> 13), @m)
    bxor(h, h >>> 15)
  end

  defp blocks(<<k::little-32, rest::binary>>, h) do
    k = mul(k, @m)
    k = mul(bxor(k, k >>> 24), @m)
    blocks(rest, bxor(mul(h, @m), k))
  end

  defp blocks(rest, h), do: {h, rest}
end

defmodule Ottla.MessageTest do
  use ExUnit.Case, async: true

  require Ottla.Message
  import Ottla.Message, only: [kafka_message: 1, kafka_message: 2]

  doctest Ottla.Message

  # A record as brod hands it out: kafka_protocol's #kafka_message{} as a tuple.
  @brod_record {:kafka_message, 41, "key", "value", :create, 1_700_000_000_123,
                [{"trace", "ab12"}]}

  describe "brod's kafka_message record macros" do
    test "read every field of a record brod made, as Elsa.Message.kafka_message/2 did" do
      assert kafka_message(@brod_record, :offset) == 41
      assert kafka_message(@brod_record, :key) == "key"
      assert kafka_message(@brod_record, :value) == "value"
      assert kafka_message(@brod_record, :ts_type) == :create
      assert kafka_message(@brod_record, :ts) == 1_700_000_000_123
      assert kafka_message(@brod_record, :headers) == [{"trace", "ab12"}]
      assert kafka_message(offset: o, value: v) = @brod_record
      assert {o, v} == {41, "value"}
    end

    test "build records with kafka_protocol's defaults" do
      assert kafka_message(offset: 1) ==
               {:kafka_message, 1, :undefined, :undefined, :undefined, :undefined, []}
    end
  end

  describe "new/2" do
    test "turns a brod record into a message with where it was read, as Elsa.Message.new/2" do
      assert Ottla.Message.new(@brod_record, topic: "orders", partition: 3, generation_id: 7) ==
               %Ottla.Message{
                 topic: "orders",
                 partition: 3,
                 offset: 41,
                 key: "key",
                 value: "value",
                 timestamp: 1_700_000_000_123,
                 headers: [{"trace", "ab12"}],
                 generation_id: 7
               }
    end

    test "keeps brod's empty key, and makes an undefined timestamp nil" do
      record = kafka_message(offset: 0, key: "", value: "v")

      assert %Ottla.Message{key: "", value: "v", timestamp: nil, generation_id: nil} =
               Ottla.Message.new(record, topic: "t", partition: 0)
    end

    test "bad input raises ArgumentError naming what is wrong" do
      for {record, attributes, named} <- [
            {{:kafka_message, 1, "k"}, [topic: "t", partition: 0], "kafka_message record"},
            {%Ottla.Message{}, [topic: "t", partition: 0], "kafka_message record"},
            {kafka_message(offset: :x), [topic: "t", partition: 0], "offset"},
            {@brod_record, [partition: 0], "topic"},
            {@brod_record, [topic: "t", partition: -1], ":partition"},
            {@brod_record, [topic: "t", partition: 0, colour: :red], "colour"},
            {@brod_record, :not_a_list, "attributes"}
          ] do
        error = assert_raise ArgumentError, fn -> Ottla.Message.new(record, attributes) end

        assert error.message =~ named,
               "#{inspect({record, attributes})}: #{error.message} does not name #{named}"
      end
    end
  end

  describe "to_kafka_message/1" do
    test "round-trips through new/2, with nil keys and values as brod's empty binaries" do
      message = %Ottla.Message{
        topic: "t",
        partition: 1,
        offset: 9,
        key: nil,
        value: "v",
        timestamp: 12,
        headers: [{"h", "1"}]
      }

      record = Ottla.Message.to_kafka_message(message)
      assert kafka_message(record, :key) == ""
      assert Ottla.Message.new(record, topic: "t", partition: 1) == %{message | key: ""}
    end

    test "refuses anything but a message" do
      assert_raise ArgumentError, ~r/Ottla.Message/, fn ->
        Ottla.Message.to_kafka_message(%{offset: 1})
      end
    end
  end
end
